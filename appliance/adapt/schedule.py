"""When an automatic adaptation job is due.

A job starts when drift fires, or when a head step is still owed after an input step made
a new expert (``LastJob.follow_up``: its features are computed under the new input, so the
cells it needs arrive only after the switch), once enough cells are stored under the
adapted expert's input and ``adapt.cooldown_scenes`` new scenes arrived since the last
job. The last job is remembered in ``state/adapt/last_job.json``, so a restart keeps the
cooldown and what is owed.
"""

from __future__ import annotations

import time
from pathlib import Path

from pydantic import BaseModel

from appliance.config import AdaptConfig
from appliance.contract.durable import atomic_write_text, read_model
from appliance.contract.payloads import AdaptationReport


class LastJob(BaseModel):
    """The last job that ran: where the candidate ring stood, when, what it left owed."""

    seq: int | None = None  # the ring's newest scene number then (None: no job yet)
    ts: float | None = None  # time.time() it ended
    follow_up: bool = False  # a head step is owed after a promoted input step


class JobSchedule:
    """Reads and writes ``LastJob`` and decides whether a job is due."""

    def __init__(self, path: Path, cfg: AdaptConfig) -> None:
        self.path = Path(path)
        self.cfg = cfg

    def last(self) -> LastJob:
        return read_model(self.path, LastJob)

    def wanted(self, drifting: bool) -> bool:
        """Automatic jobs are on, and drift fired or a head step is owed."""
        if not (self.cfg.enabled and self.cfg.auto):
            return False
        return drifting or self.last().follow_up

    def cooled_down(self, seq: int) -> bool:
        """``adapt.cooldown_scenes`` scenes were stored since the last job (``seq``: the
        ring's newest scene number now)."""
        last = self.last().seq
        return last is None or seq - last >= self.cfg.cooldown_scenes

    def mark(self, report: AdaptationReport, seq: int) -> None:
        """Remember a finished job: where the ring stood and whether a head step is owed
        (after a promoted input step, and still after a skipped job that owed one)."""
        owed = self.last().follow_up and report.action == "skipped"
        follow_up = (report.step == "input" and report.promoted) or owed
        atomic_write_text(self.path, LastJob(seq=seq, ts=time.time(),
                                             follow_up=follow_up).model_dump_json())
