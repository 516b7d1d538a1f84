"""How many scenes each expert served, and which have gone idle.

A box that met several sensors holds an expert per domain, but a sensor can leave for good
(a camera replaced, a season over). After every scene the expert that classified it is
counted here; an expert that served none of the last ``adapt.expert_idle_scenes`` scenes
it was in the running version for is idle, and the next job retires it from the active
version (older versions keep it). Idle time counts only while an expert runs: one that
comes back in a rollback starts again from zero, so a rollback is not undone by the next
job. The counts are what ``models list``, status and model events report. Kept in
``state/adapt/usage.json``, so a restart keeps them.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field

from appliance.contract.bundle import Bundle
from appliance.contract.durable import atomic_write_text, read_model
from appliance.contract.payloads import ExpertUse

SOURCE = "source"  # the source model's name in the counts


class Served(BaseModel):
    """One expert's count: scenes it served, and scenes in a row it did not serve while
    it was in the running version."""

    scenes: int = 0
    idle: int = 0


class UsageFile(BaseModel):
    """``usage.json``: per expert name (retired ones too) what it served, and the names
    of the version that ran the last scene."""

    experts: dict[str, Served] = Field(default_factory=dict)
    running: list[str] = Field(default_factory=list)


def _names(bundle: Bundle) -> list[str]:
    return [SOURCE, *(d.name for d in bundle.manifest.experts)]


class ExpertUsage:
    """Counts the scenes each expert of the running bundle serves."""

    def __init__(self, path: Path, idle_scenes: int) -> None:
        self.path = Path(path)
        self.idle_scenes = idle_scenes

    def read(self) -> UsageFile:
        return read_model(self.path, UsageFile)

    def record(self, bundle: Bundle, domain: str | None) -> None:
        """One scene of ``bundle`` was routed to ``domain`` (None: the source model)."""
        usage = self.read()
        names = _names(bundle)
        for name in names:
            served = usage.experts.setdefault(name, Served())
            if name not in usage.running:
                served.idle = 0  # new, or back after a rollback: its idle time starts now
            if name == (domain or SOURCE):
                served.scenes += 1
                served.idle = 0
            else:
                served.idle += 1
        usage.running = names
        atomic_write_text(self.path, usage.model_dump_json())

    def summary(self, bundle: Bundle) -> list[ExpertUse]:
        """The paths of ``bundle``, source first, with their counts."""
        usage = self.read()
        out = []
        for name in _names(bundle):
            served = usage.experts.get(name, Served())
            out.append(ExpertUse(name=name, scenes=served.scenes,
                                 idle_scenes=served.idle if name in usage.running else 0))
        return out

    def idle(self, bundle: Bundle) -> list[str]:
        """Experts of ``bundle`` that served none of the last ``idle_scenes`` scenes."""
        return [u.name for u in self.summary(bundle)
                if u.name != SOURCE and u.idle_scenes >= self.idle_scenes]

    def names(self) -> set[str]:
        """Every expert name ever counted (retired ones included)."""
        return set(self.read().experts)
