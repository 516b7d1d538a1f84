"""``/healthz`` (the process answers) and ``/readyz`` (the node can take a scene now).

Ready means: the model is loaded and the node past its start-up reconciliation, the
journal takes a write, and the results and state disks have more free space than the
disk floor (the space a scene's outputs need before they are written; below it a scene
fails with ``disk-full``). An orchestrator or a load balancer stops sending work to a
node that is not ready and alerts on it; ``healthz`` only says the process is alive, so a
restart is never triggered by a full disk.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from appliance.config import Settings
from appliance.ingest.journal import Journal
from appliance.model.host import ModelHost

MB = 1024 * 1024


def disk_floor_mb(settings: Settings) -> int:
    """The free space (MB) the results disk must keep; the one place that names the key."""
    return settings.paths.min_free_mb


def free_bytes(path: Path) -> int:
    """Free bytes for unprivileged writers on the filesystem holding ``path``."""
    return shutil.disk_usage(path).free


@dataclass(frozen=True)
class Check:
    """One readiness condition and what was seen."""

    name: str
    ok: bool
    detail: str


@dataclass(frozen=True)
class Readiness:
    """The verdict of ``/readyz``: ready when every check passed."""

    checks: list[Check]

    @property
    def ready(self) -> bool:
        return all(c.ok for c in self.checks)

    def as_dict(self) -> dict[str, Any]:
        return {"ready": self.ready, "checks": [asdict(c) for c in self.checks]}


class Health:
    """Judges readiness from the parts that know: model host, journal, the disks."""

    def __init__(self, settings: Settings, host: ModelHost, journal: Journal,
                 started: Callable[[], bool]) -> None:
        self.settings = settings
        self._host = host
        self._journal = journal
        self._started = started  # past reconciliation and not stopping

    def disks(self) -> dict[str, Path]:
        """The folders whose disks must stay above the floor."""
        paths = self.settings.paths
        return {"results": paths.results, "state": paths.state}

    def readiness(self) -> Readiness:
        bundle = self._host.bundle
        model = Check("model", self._host.serving and self._started(),
                      f"{bundle.manifest.name} v{bundle.version}"
                      + ("" if self._started() else " (not ready: starting or stopping)"))
        writable = self._journal.writable()
        journal = Check("journal", writable, "takes writes" if writable else "refuses writes")
        floor = disk_floor_mb(self.settings)
        checks = [model, journal]
        for name, folder in self.disks().items():
            try:
                free = free_bytes(folder) / MB
            except OSError as exc:
                checks.append(Check(f"disk:{name}", False, f"{folder}: {exc.strerror}"))
                continue
            checks.append(Check(f"disk:{name}", free >= floor,
                                f"{free:.0f} MB free, floor {floor} MB"))
        return Readiness(checks)
