"""What the node tells about itself: its state, counters and timings, status and stats.

``Telemetry`` is the one owner of the node's state (``State``) and of its counters. The
retained status is built from the parts at the moment it is published (model and
providers from the model host, queue depth from the inbox, scene counts from the
journal, drift from the monitor), so it can never lag behind them; every state change
republishes it and updates the systemd status line.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from enum import Enum
from importlib.metadata import PackageNotFoundError, version

from appliance.adapt.drift import DriftMonitor
from appliance.contract.payloads import ModelRef, StatsPayload, StatusPayload
from appliance.ingest.inbox import Inbox
from appliance.ingest.journal import Journal
from appliance.ingest.lifecycle import Outcome
from appliance.model.host import ModelHost
from appliance.systemd import Notifier

RECENT_TIMINGS = 20  # scenes whose stage timings the stats average


class State(str, Enum):
    """What the node is doing."""

    STARTING = "starting"
    READY = "ready"
    PROCESSING = "processing"
    STOPPING = "stopping"


def software_version() -> str:
    try:
        return version("terratile")
    except PackageNotFoundError:
        return "unknown"


class Telemetry:
    """State, counters and timings of the node, and the payloads that report them."""

    def __init__(self, node_id: str, notifier: Notifier, host: ModelHost, inbox: Inbox,
                 journal: Journal, drift: DriftMonitor | None,
                 adapting: Callable[[], bool]) -> None:
        self.node_id = node_id
        self.notifier = notifier
        self._host = host
        self._inbox = inbox
        self._journal = journal
        self._drift = drift
        self._adapting = adapting
        self._listeners: list[Callable[[], None]] = []
        self.state = State.STARTING
        self.started = time.monotonic()
        self.busy_since: float | None = None  # a scene is being processed since then
        self.counters = {"done": 0, "failed": 0, "duplicates": 0}
        self._timings: list[dict[str, float]] = []

    def on_change(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` when the status changed (comms republishes it)."""
        self._listeners.append(listener)

    def set_state(self, state: State, force: bool = False) -> None:
        """Enter ``state``; with ``force`` announce the status even if it is unchanged."""
        if state == self.state and not force:
            return
        self.state = state
        self.changed()

    def changed(self) -> None:
        """Something the status shows changed: update systemd's line, tell the listeners."""
        self.notifier.status(self.status_line())
        for listener in self._listeners:
            listener()

    # -- the scene lifecycle's observer -----------------------------------------------------

    def scene_started(self, scene_id: str) -> None:
        self.busy_since = time.monotonic()
        self.set_state(State.PROCESSING)

    def scene_ended(self, outcome: Outcome, timings: dict[str, float] | None = None) -> None:
        self.busy_since = None
        key = "duplicates" if outcome == "duplicate" else outcome
        self.counters[key] += 1
        if timings is not None:
            self._timings = [*self._timings[-(RECENT_TIMINGS - 1):], timings]

    # -- payloads ---------------------------------------------------------------------------

    def status_line(self) -> str:
        bundle = self._host.bundle
        return (f"{self.state.value}; model {bundle.manifest.name} v{bundle.version}; "
                f"queue {self._inbox.depth()}; done {self.counters['done']}, "
                f"failed {self.counters['failed']}")

    def status(self) -> StatusPayload:
        """The retained status payload, built now."""
        drift = (self._drift.status().model_copy(update={"adapting": self._adapting()})
                 if self._drift is not None else None)
        return StatusPayload(
            node_id=self.node_id, state=self.state.value,
            model=ModelRef.of(self._host.bundle.manifest),
            providers=self._host.runtime.providers, queue_depth=self._inbox.depth(),
            counts=self._journal.counts(), version=software_version(), drift=drift)

    def status_json(self) -> str:
        return self.status().to_json()

    def stats(self) -> StatsPayload:
        """Counters, and the mean seconds per stage over the recent scenes."""
        keys = sorted({k for t in self._timings for k in t})
        means = {k: sum(t.get(k, 0.0) for t in self._timings) / len(self._timings)
                 for k in keys} if self._timings else {}
        return StatsPayload(node_id=self.node_id,
                            uptime_s=round(time.monotonic() - self.started, 3),
                            counters=dict(self.counters), timings=means,
                            outbox_depth=self._journal.outbox_depth(),
                            queue_depth=self._inbox.depth())
