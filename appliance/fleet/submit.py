"""Scene jobs onto the fleet's shared work queue, each held under a lease until it ends.

The broker hands each job to one node and never moves it to another (the docs' "A fleet
on one broker" page has the measurements), so the submitter holds the guarantee: every
job has a lease. A job is published to ``<prefix>/jobs`` with this client's reply topic;
the node that takes it answers ``accepted`` once it is committed, then ``done`` (with
its result's msg_id) or ``failed`` (with a reason). A job with no event for ``lease``
seconds (since it was sent or accepted), or whose node goes ``offline``, is published
again under the same ``job_id``. That is safe: a node that already has the job answers
with its final event, and a scene done on two nodes carries the same result msg_id on
both. The first final event of a job is its outcome; later ones are ignored. At most
``window`` jobs are out and not yet accepted at once; the rest of a backlog waits in the
submitter.

Job ids are fresh for every ``submit_jobs`` call (a changed object at the same URL must
not be answered from an old job), and stable across its re-submissions.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import ValidationError

from appliance.comms.topics import AVAILABLE
from appliance.contract.payloads import JOB_SCHEMA, JobEvent, SceneJob
from appliance.fleet.link import FleetLink

JobState = Literal["waiting", "sent", "accepted", "done", "failed", "unfinished"]


@dataclass(frozen=True)
class SceneRequest:
    """One scene to submit: its reference and, optionally, the digest of its bytes."""

    scene: str
    sha256: str | None = None


@dataclass
class JobTrack:
    """What the submitter knows of one job."""

    job: SceneJob
    topic: str  # where it is published
    state: JobState = "waiting"  # not published yet: the window is full
    node: str | None = None  # the node that accepted it or ended it
    scene_id: str | None = None
    result_msg_id: str | None = None
    reason: str | None = None
    message: str | None = None
    submissions: int = 0  # times published
    lease_from: float = field(default_factory=time.monotonic)

    @property
    def ended(self) -> bool:
        return self.state in ("done", "failed", "unfinished")

    @property
    def leased(self) -> bool:
        """Published and not ended: its lease runs."""
        return self.state in ("sent", "accepted")

    def as_dict(self) -> dict[str, Any]:
        return {"job_id": self.job.job_id, "scene": self.job.scene, "state": self.state,
                "node": self.node, "scene_id": self.scene_id, "result_msg_id": self.result_msg_id,
                "reason": self.reason, "message": self.message,
                "submissions": self.submissions}


@dataclass(frozen=True)
class SubmitReport:
    """Every job's outcome, in submission order."""

    jobs: list[JobTrack]
    seconds: float

    def count(self, state: JobState) -> int:
        return sum(1 for j in self.jobs if j.state == state)

    @property
    def complete(self) -> bool:
        """True when every job is done."""
        return all(j.state == "done" for j in self.jobs)

    def as_dict(self) -> dict[str, Any]:
        return {"schema": "terratile.fleet-submit/1", "seconds": round(self.seconds, 3),
                "done": self.count("done"), "failed": self.count("failed"),
                "unfinished": self.count("unfinished"),
                "resubmitted": sum(max(j.submissions - 1, 0) for j in self.jobs),
                "jobs": [j.as_dict() for j in self.jobs]}


Progress = Callable[[JobTrack, str], None]
"""Told of each change of a job: the track and what happened (``accepted``, ``done``,
``failed``, ``resubmitted``)."""


def submit_jobs(link: FleetLink, scenes: list[SceneRequest], lease: float,
                timeout: float | None = None, progress: Progress = lambda _t, _w: None,
                window: int = 64, topic: str | None = None) -> SubmitReport:
    """Publish one job per scene and follow them until each has ended (or ``timeout``
    seconds have passed: the rest are ``unfinished``).

    Jobs go to ``<prefix>/jobs``, or to ``topic`` (e.g. the jobs topic of one site behind
    a bridge, at the central broker).

    At most ``window`` jobs are published and not yet accepted at any time; the others
    wait here, not in the broker. A backlog of thousands of scenes then never sits in the
    nodes' broker sessions (mosquitto drops what exceeds a session's
    ``max_queued_messages``) and a job's lease starts when it is sent, not while it
    waits behind the backlog."""
    start = time.monotonic()
    run = uuid.uuid4().hex[:12]
    tracks = {}
    for i, request in enumerate(scenes):
        job = SceneJob(schema_=JOB_SCHEMA, job_id=f"{run}-{i}", scene=request.scene,
                       sha256=request.sha256, reply_to=link.reply_topic)
        tracks[job.job_id] = JobTrack(job, topic or link.topics.jobs)
    link.subscribe(link.topics.every(AVAILABLE))
    end = None if timeout is None else start + timeout
    while not all(t.ended for t in tracks.values()):
        _fill_window(link, tracks, window)
        now = time.monotonic()
        if end is not None and now >= end:
            break
        expiry = min(t.lease_from + lease for t in tracks.values() if t.leased)
        msg = link.receive(min(expiry, end) if end is not None else expiry)
        if msg is not None:
            if msg.topic == link.reply_topic:
                _on_event(tracks, bytes(msg.payload), progress)
            elif (node := link.topics.sender(msg.topic, AVAILABLE)) is not None \
                    and bytes(msg.payload) == b"offline":
                _on_offline(link, tracks, node, progress)
        now = time.monotonic()
        for track in tracks.values():
            if track.leased and now >= track.lease_from + lease:
                _resubmit(link, track, progress)
    for track in tracks.values():
        if not track.ended:
            track.state = "unfinished"
    return SubmitReport(list(tracks.values()), time.monotonic() - start)


def _fill_window(link: FleetLink, tracks: dict[str, JobTrack], window: int) -> None:
    """Publish waiting jobs while fewer than ``window`` are sent and not accepted."""
    sent = sum(1 for t in tracks.values() if t.state == "sent")
    for track in tracks.values():
        if sent >= window:
            return
        if track.state == "waiting":
            track.state = "sent"
            _publish(link, track)
            sent += 1


def _publish(link: FleetLink, track: JobTrack) -> None:
    link.publish(track.topic, track.job.to_json())
    track.submissions += 1
    track.lease_from = time.monotonic()


def _resubmit(link: FleetLink, track: JobTrack, progress: Progress) -> None:
    track.state, track.node = "sent", None
    _publish(link, track)
    progress(track, "resubmitted")


def _on_offline(link: FleetLink, tracks: dict[str, JobTrack], node: str,
                progress: Progress) -> None:
    """A node went offline: the jobs it accepted and did not end go to the others."""
    for track in tracks.values():
        if track.state == "accepted" and track.node == node:
            _resubmit(link, track, progress)


def _on_event(tracks: dict[str, JobTrack], payload: bytes, progress: Progress) -> None:
    try:
        event = JobEvent.model_validate_json(payload)
    except ValidationError:
        return  # not a job event (e.g. the link's own sync marker)
    track = tracks.get(event.job_id or "")
    if track is None or track.ended:
        return  # another run's job, or a late answer from a second node
    if event.event == "accepted":
        track.state, track.node = "accepted", event.node_id
        track.lease_from = time.monotonic()
    else:
        track.state, track.node, track.scene_id = event.event, event.node_id, event.scene_id
        track.result_msg_id, track.reason, track.message = (event.result_msg_id, event.reason,
                                                            event.message)
    progress(track, event.event)
