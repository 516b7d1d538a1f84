"""What the node tells about itself: its state, counters and timings, status and stats.

``Telemetry`` is the one owner of the node's state (``State``) and of its counters. The
retained status is built from the parts at the moment it is published (model and
providers from the model host, queue depth from the inbox, scene counts and outbox depth
from the journal, the broker connection from comms, drift from the monitor, low disks
from the disk guard), so it can never lag behind them. It is announced (MQTT listeners,
the systemd status line, ``state/status.json`` for ``terratile status``) on every state
change and, through ``refresh`` on every turn of the main loop and on every change of the
broker connection, whenever what it shows differs from what was last announced: a queue
that emptied or a broker that went away is reported without waiting for the next scene.

``degraded`` lists why a running node is not fully working (``mqtt``: the broker cannot
be reached and results wait in the outbox, or it refuses a subscription or messages;
``disk``: a folder is below
``paths.min_free_mb`` and no new file is claimed). ``status()`` is the typed snapshot
other readers (an HTTP endpoint, the CLI) take.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from enum import Enum
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from appliance.adapt.drift import DriftMonitor
from appliance.contract.durable import atomic_write_text
from appliance.contract.payloads import (
    ExpertUse,
    ModelRef,
    MqttStatus,
    StatsPayload,
    StatusPayload,
)
from appliance.ingest.inbox import Inbox
from appliance.ingest.journal import Journal
from appliance.ingest.lifecycle import Outcome
from appliance.model.host import ModelHost
from appliance.systemd import Notifier

log = logging.getLogger(__name__)

RECENT_TIMINGS = 20  # scenes whose stage timings the stats average
STATUS_FILE = "status.json"  # under paths.state: the daemon's last status, for the CLI


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
                 adapting: Callable[[], bool], state_dir: Path | None = None,
                 experts: Callable[[], list[ExpertUse]] = list) -> None:
        self.node_id = node_id
        self.notifier = notifier
        self._host = host
        self._inbox = inbox
        self._journal = journal
        self._drift = drift
        self._adapting = adapting
        self._experts = experts  # the running model's paths and the scenes each served
        self._status_file = state_dir / STATUS_FILE if state_dir is not None else None
        self._mqtt: Callable[[], MqttStatus] | None = None
        self._low_disks: Callable[[], list[str]] = list
        self._listeners: list[Callable[[], None]] = []
        self._announced: Any = None  # what the last announced status showed
        self._announce_lock = threading.RLock()
        self.state = State.STARTING
        self.started = time.monotonic()
        self.busy_since: float | None = None  # a scene is being processed since then
        self.counters = {"done": 0, "failed": 0, "duplicates": 0}
        self._timings: list[dict[str, float]] = []

    def on_change(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` when the status changed (comms republishes it)."""
        self._listeners.append(listener)

    def watch_mqtt(self, connection: Callable[[], MqttStatus]) -> None:
        """Report the broker connection ``connection()`` gives (MQTT is on)."""
        self._mqtt = connection

    def watch_disks(self, low: Callable[[], list[str]]) -> None:
        """Report ``disk`` as degraded while ``low()`` names folders short of space."""
        self._low_disks = low

    def set_state(self, state: State, force: bool = False) -> None:
        """Enter ``state``; with ``force`` announce the status even if it is unchanged."""
        if state == self.state and not force:
            return
        self.state = state
        self.changed()

    def idle(self) -> None:
        """The main loop has nothing to do: the node is ready; announce what changed."""
        if self.state != State.READY:
            self.set_state(State.READY)
        else:
            self.refresh()

    def refresh(self) -> None:
        """Announce the status if it shows something else than the last announced one."""
        if _shown(self.status()) != self._announced:
            self.changed()

    def changed(self) -> None:
        """Something the status shows changed: update systemd's line and the status file,
        tell the listeners. One announcement at a time (the main loop and the MQTT
        thread both announce), so an older status is never published after a newer one."""
        with self._announce_lock:
            status = self.status()
            self._announced = _shown(status)
            self.notifier.status(self.status_line(status))
            if self._status_file is not None:
                try:
                    atomic_write_text(self._status_file, status.to_json())
                except OSError as exc:  # a full state disk must not stop the node
                    log.warning("cannot write %s: %s", self._status_file, exc)
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

    def degraded(self, mqtt: MqttStatus | None = None) -> list[str]:
        """Why the running node is not fully working (empty: it is)."""
        out = []
        link = mqtt if mqtt is not None else (self._mqtt() if self._mqtt else None)
        if link is not None and (not link.connected or link.refused_subscriptions
                                 or link.refused_messages):
            out.append("mqtt")
        if self._low_disks():
            out.append("disk")
        return out

    def status_line(self, status: StatusPayload | None = None) -> str:
        """The one-line status (systemd's STATUS=)."""
        s = status or self.status()
        state = s.state + (f" (degraded: {', '.join(s.degraded)})" if s.degraded else "")
        model = f"model {s.model.name} v{s.model.version}" if s.model else "no model"
        link = ""
        if s.mqtt is not None and not s.mqtt.connected:
            link = f"; mqtt down ({s.mqtt.attempts} attempts)"
        return (f"{state}; {model}; queue {s.queue_depth}; outbox {s.outbox_depth}{link}; "
                f"done {self.counters['done']}, failed {self.counters['failed']}")

    def status(self) -> StatusPayload:
        """The retained status payload, built now."""
        drift = (self._drift.status().model_copy(update={"adapting": self._adapting()})
                 if self._drift is not None else None)
        mqtt = self._mqtt() if self._mqtt is not None else None
        return StatusPayload(
            node_id=self.node_id, state=self.state.value,
            model=ModelRef.of(self._host.bundle.manifest),
            providers=self._host.runtime.providers, queue_depth=self.queue_depth(),
            counts=self._journal.counts(), version=software_version(), drift=drift,
            mqtt=mqtt, outbox_depth=self._journal.outbox_depth(),
            experts=self._experts(), degraded=self.degraded(mqtt))

    def status_json(self) -> str:
        return self.status().to_json()

    def queue_depth(self) -> int:
        """Work waiting or running: inbox files, and fleet jobs taken and not yet ended."""
        return self._inbox.depth() + self._journal.open_job_count()

    def stats(self) -> StatsPayload:
        """Counters, and the mean seconds per stage over the recent scenes."""
        keys = sorted({k for t in self._timings for k in t})
        means = {k: sum(t.get(k, 0.0) for t in self._timings) / len(self._timings)
                 for k in keys} if self._timings else {}
        return StatsPayload(node_id=self.node_id,
                            uptime_s=round(time.monotonic() - self.started, 3),
                            counters=dict(self.counters), timings=means,
                            outbox_depth=self._journal.outbox_depth(),
                            queue_depth=self.queue_depth())


def _shown(status: StatusPayload) -> Any:
    """What a status shows that is worth announcing (all but its id and time; the broker's
    failed attempts change only while nothing can be published, so they cost no traffic)."""
    return (status.state, status.model, status.queue_depth, status.outbox_depth,
            status.degraded, tuple(sorted(status.counts.items())), status.drift, status.mqtt)
