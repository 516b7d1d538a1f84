"""The node's side of the fleet's shared work queue: scene jobs from the broker.

Every node of a fleet subscribes to ``$share/<fleet.group>/<prefix>/jobs``, so the broker
hands each job to one of them. A job (``SceneJob``) names its scene by reference; this
module takes it from delivery to its final event:

1. **Delivery** (``offer``, on the MQTT network thread, so it only reads and commits):
   a job larger than ``fleet.max_job_bytes``, not valid JSON of the job schema, or whose
   scene reference ``scene_ref.resolve`` refuses is answered ``failed`` at once (QoS 0:
   a flood of junk costs a refusal each, never a queue, and the lease of a real
   submitter covers a lost one) and acknowledged. A valid job is committed to the
   journal with its ``accepted`` event *before* it is acknowledged, so a node killed
   between delivery and commit loses nothing: the broker re-sends the job (its session
   lives ``fleet.session_expiry``) and the journal recognises its ``job_id``.
2. **Back-pressure**: a committed job is acknowledged at once while the node holds at
   most ``fleet.max_inflight`` open jobs; beyond that its acknowledgement waits until a
   job ends. With the connection's Receive Maximum at ``fleet.max_inflight`` the broker
   sends no more unacknowledged jobs than that, so a node never holds more than twice
   ``fleet.max_inflight`` jobs, whatever is published.
3. **Run** (the main loop, one job between two inbox files): ``resolve`` again (the
   config may have changed), ``identify`` (a HEAD, or the bytes of a shared file), then
   the same scene steps as an inbox file (``SceneLifecycle.handle_source``); the job ends
   ``done`` with the msg_id of the scene's result (derived from the stable scene id, so
   the same on every node and every re-run) or ``failed`` with the reason slug. A job
   submitted again (its lease expired) under a known ``job_id`` is answered with the
   final event it already had; a scene already done is re-announced, not recomputed.

After a restart, open jobs are run again (``resume``); the scene's attempt count still
turns a scene that keeps killing the node into ``crash-loop``. Events go to the job's
``reply_to`` when ``Topics.response_topic_problem`` accepts it, else to
``<p>/jobs/events``.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

from pydantic import ValidationError

from appliance.comms.message import Message
from appliance.comms.mqtt import JobDelivery
from appliance.comms.topics import JOB_EVENTS, Topics
from appliance.config import FleetConfig, InputConfig
from appliance.contract.payloads import (
    JobEvent,
    JobEventKind,
    SceneJob,
    job_event_msg_id,
    result_msg_id,
)
from appliance.ingest.journal import JobRecord, Journal
from appliance.ingest.lifecycle import SceneLifecycle
from appliance.ingest.scene_ref import Refused, identify, resolve

log = logging.getLogger(__name__)

MAX_REPLY_TOPIC = 256
Submit = Callable[[Callable[[], None]], None]
"""Runs a task on the main loop."""


class WorkQueue:
    """Jobs from the shared queue, through the journal, to their events (module docstring)."""

    def __init__(self, journal: Journal, lifecycle: SceneLifecycle, cfg: FleetConfig,
                 input_cfg: InputConfig, topics: Topics, submit: Submit,
                 ack: Callable[[JobDelivery], bool], publish_now: Callable[[str, str], None],
                 kick: Callable[[], None], stopping: Callable[[], bool]) -> None:
        self.journal = journal
        self.lifecycle = lifecycle
        self.cfg = cfg
        self.input_cfg = input_cfg
        self.topics = topics
        self._submit = submit
        self._ack = ack
        self._publish_now = publish_now
        self._kick = kick
        self._stopping = stopping
        self._held: deque[JobDelivery] = deque()  # committed, acknowledgement waiting
        self._lock = threading.Lock()
        self._scheduled = threading.Event()  # a run task is queued on the main loop

    # -- delivery (network thread) ----------------------------------------------------------

    def offer(self, delivery: JobDelivery) -> None:
        """One job from the broker: refused at once, or committed and then acknowledged
        (now, or when a slot frees)."""
        job, refusal = self._parse(delivery.payload)
        if job is None:
            assert refusal is not None
            self._publish_now(*refusal)
            self._ack(delivery)
            return
        accepted = self._event(job, "accepted")
        record = self.journal.add_job(job.job_id, job.to_json(), accepted)
        if record.final is not None:  # submitted again after it ended: the same answer
            self.journal.enqueue(record.final)
        self._kick()
        with self._lock:
            if self.journal.open_job_count() <= self.cfg.max_inflight:
                self._ack(delivery)
            else:
                self._held.append(delivery)
        self._schedule()

    def _parse(self, payload: bytes) -> tuple[SceneJob | None, tuple[str, str] | None]:
        """The job, or the (topic, payload) of its refusal."""
        if len(payload) > self.cfg.max_job_bytes:
            return None, self._refusal(None, None, "malformed", f"{len(payload)} bytes is more "
                                       f"than fleet.max_job_bytes ({self.cfg.max_job_bytes})")
        try:
            job = SceneJob.model_validate_json(payload)
        except ValidationError as exc:
            loose = _loose_fields(payload)
            first = exc.errors()[0]
            where = ".".join(str(x) for x in first["loc"]) or "job"
            return None, self._refusal(loose.get("job_id"), loose.get("reply_to"), "malformed",
                                       f"{where}: {first['msg']}"[:300])
        try:
            resolve(job.scene, self.cfg)
        except Refused as exc:
            return None, self._refusal(job.job_id, job.reply_to, exc.reason, exc.message,
                                       job.scene)
        return job, None

    def _refusal(self, job_id: str | None, reply_to: str | None, reason: str, text: str,
                 scene: str | None = None) -> tuple[str, str]:
        event = JobEvent(node_id=self.topics.node_id, job_id=job_id, event="failed",
                         scene=scene, reason=reason, message=text)
        log.warning("job %s refused (%s): %s", job_id or "?", reason, text)
        return self._reply_topic(reply_to), event.to_json()

    # -- running (main loop) ----------------------------------------------------------------

    def resume(self) -> None:
        """At start: run the jobs a stop or crash left open."""
        left = len(self.journal.open_jobs())
        if left:
            log.info("%d fleet job(s) left open will run", left)
            self._schedule()

    def _schedule(self) -> None:
        if not self._scheduled.is_set():
            self._scheduled.set()
            self._submit(self.run_next)

    def run_next(self) -> None:
        """Run the oldest open job; schedule the next one (between inbox files)."""
        self._scheduled.clear()
        if self._stopping():
            return
        jobs = self.journal.open_jobs()
        if not jobs:
            return
        try:
            ended = self._run(jobs[0])
        except Exception as exc:  # a bug must cost the job, not the node
            log.exception("job %s: unexpected error", jobs[0].job_id)
            self._end(SceneJob.model_validate_json(jobs[0].job), "failed", reason="error",
                      message=f"{type(exc).__name__}: {exc}")
            ended = True
        if ended:
            self._release()
            if len(jobs) > 1:
                self._schedule()

    def _run(self, record: JobRecord) -> bool:
        """One job to its end; False when a stop interrupted it (it stays open)."""
        job = SceneJob.model_validate_json(record.job)
        try:
            source = resolve(job.scene, self.cfg)
            scene_id = identify(source, job.sha256, self.cfg, self.input_cfg.max_file_bytes)
        except Refused as exc:
            self._end(job, "failed", reason=exc.reason, message=exc.message)
            return True
        self.journal.job_scene(job.job_id, scene_id)
        log.info("job %s: scene %s from %s", job.job_id, scene_id[:12], source.location[:200])
        handled = self.lifecycle.handle_source(source, scene_id)
        if handled == "interrupted":
            return False
        if handled in ("done", "duplicate"):
            self._end(job, "done", scene_id=scene_id, result=result_msg_id(scene_id))
            return True
        scene = self.journal.get(scene_id)
        self._end(job, "failed", scene_id=scene_id,
                  reason=scene.reason if scene else "error",
                  message=scene.message if scene else "the scene failed")
        return True

    def _end(self, job: SceneJob, state: JobEventKind, scene_id: str | None = None,
             result: str | None = None, reason: str | None = None,
             message: str | None = None) -> None:
        event = self._event(job, state, scene_id=scene_id, result_msg_id=result, reason=reason,
                            message=message)
        self.journal.end_job(job.job_id, state, event)
        self._kick()
        log.info("job %s: %s%s", job.job_id, state, f" ({reason})" if reason else "")

    def _release(self) -> None:
        """A job ended: acknowledge one whose acknowledgement waited for a slot (held ones
        from an earlier connection are dropped: the broker re-sends those jobs)."""
        with self._lock:
            if self.journal.open_job_count() > self.cfg.max_inflight:
                return
            while self._held and not self._ack(self._held.popleft()):
                pass

    # -- events ------------------------------------------------------------------------------

    def _event(self, job: SceneJob, kind: JobEventKind, **fields: Any) -> Message:
        event = JobEvent(msg_id=job_event_msg_id(job.job_id, kind),
                         node_id=self.topics.node_id, job_id=job.job_id, event=kind,
                         scene=job.scene, **fields)
        return Message(event.msg_id, self._reply_topic(job.reply_to), event.to_json())

    def _reply_topic(self, reply_to: str | None) -> str:
        if reply_to is not None:
            problem = self.topics.response_topic_problem(reply_to, MAX_REPLY_TOPIC)
            if problem is None:
                return reply_to
            log.warning("job reply topic %r refused (%s); using %s", reply_to[:120], problem,
                        self.topics.node(JOB_EVENTS))
        return self.topics.node(JOB_EVENTS)


def _loose_fields(payload: bytes) -> dict[str, str]:
    """``job_id`` and ``reply_to`` of an invalid job, when they are plain short strings:
    enough to address its refusal."""
    try:
        doc = json.loads(payload)
    except ValueError:
        return {}
    if not isinstance(doc, dict):
        return {}
    return {k: v for k in ("job_id", "reply_to")
            if isinstance(v := doc.get(k), str) and 0 < len(v) <= 256 and v.isprintable()}
