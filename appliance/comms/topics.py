"""Every MQTT topic the node publishes or listens on, in one place.

A node's topics live under ``<prefix>/<node_id>`` (``<p>``). Only this module spells
topic names; everyone else asks it, so a rename or a new topic is one edit and the
scene lifecycle (which writes result rows into the outbox) and the transport agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

AVAILABLE: Final = "available"  # retained online/offline, LWT
STATUS: Final = "status"  # retained status payload
STATS: Final = "stats"  # QoS 0 counters and timings
DRIFT_EVENTS: Final = "events/drift"
MODEL_EVENTS: Final = "events/model"
RETRIEVAL_QUERY: Final = "retrieval/query"
JOB_EVENTS: Final = "jobs/events"  # a job's events when it names no reply topic
_JOBS: Final = "jobs"  # <prefix>/jobs: the fleet's shared work queue
_COMMANDS: Final = "cmd"


@dataclass(frozen=True)
class Topics:
    """The topic names of one node."""

    prefix: str
    node_id: str

    @property
    def base(self) -> str:
        """``<prefix>/<node_id>``."""
        return f"{self.prefix}/{self.node_id}"

    def node(self, suffix: str) -> str:
        """``<p>/<suffix>``."""
        return f"{self.base}/{suffix}"

    def scene(self, scene_id: str, kind: str) -> str:
        """``<p>/scene/<scene_id>/<kind>`` (``result`` or ``failed``)."""
        return self.node(f"scene/{scene_id}/{kind}")

    @property
    def commands(self) -> str:
        """The subscription for every command, ``<p>/cmd/+``."""
        return self.node(f"{_COMMANDS}/+")

    def command(self, verb: str) -> str:
        return self.node(f"{_COMMANDS}/{verb}")

    def verb(self, topic: str) -> str | None:
        """The verb of a command topic, None for any other topic."""
        head = self.node(f"{_COMMANDS}/")
        return topic[len(head):] if topic.startswith(head) else None

    def response(self, request_suffix: str, request_id: str | None) -> str:
        """Where a reply goes without an MQTT 5 response topic:
        ``<p>/<base>/response[/<request_id>]`` for a request on ``<p>/<base>/<verb>``."""
        base = request_suffix.rsplit("/", 1)[0] if "/" in request_suffix else request_suffix
        topic = self.node(f"{base}/response")
        return f"{topic}/{request_id}" if request_id else topic

    def response_topic_problem(self, topic: str, max_length: int) -> str | None:
        """Why a requester's MQTT 5 response topic must not be published to, or None.

        A reply goes wherever the requester says, so the topic could otherwise aim the
        box's own publish at a command topic (which it would then run), a forged scene
        result or ``available``. Refused: anything in the whole ``<prefix>/`` tree (this
        node's topics and every other node's that shares the prefix: a reply must never
        speak for any node), wildcards, NUL and other control characters, ``$`` topics
        (broker-reserved), empty topics and those longer than ``max_length`` UTF-8 bytes.
        """
        if not topic:
            return "empty"
        try:
            size = len(topic.encode("utf-8"))
        except UnicodeEncodeError:
            return "not valid UTF-8"
        if size > max_length:
            return f"{size} bytes, longer than {max_length}"
        if "+" in topic or "#" in topic:
            return "contains a wildcard"
        if not topic.isprintable():
            return "contains NUL or another control character"
        if topic.startswith("$"):
            return "starts with $ (reserved by the broker)"
        if topic == self.prefix or topic.startswith(f"{self.prefix}/"):
            return f"inside the appliance tree {self.prefix}/"
        return None


@dataclass(frozen=True)
class FleetTopics:
    """The topic names across every node that shares ``prefix``: the fleet's view.

    A client that speaks to the whole fleet subscribes to one wildcard per kind of
    message (``<prefix>/+/<suffix>``) and reads the node back from each topic. Its own
    replies go under ``<prefix>-fleet/<client_id>``: outside the ``<prefix>/`` tree, where
    ``Topics.response_topic_problem`` lets a node answer.
    """

    prefix: str

    def of(self, node_id: str) -> Topics:
        """The topics of one node."""
        return Topics(self.prefix, node_id)

    def every(self, suffix: str) -> str:
        """The subscription to ``suffix`` of every node, ``<prefix>/+/<suffix>``."""
        return f"{self.prefix}/+/{suffix}"

    def sender(self, topic: str, suffix: str) -> str | None:
        """The node that published ``topic`` as its ``<prefix>/<node>/<suffix>``, else None."""
        head, tail = f"{self.prefix}/", f"/{suffix}"
        if not (topic.startswith(head) and topic.endswith(tail)):
            return None
        node = topic[len(head):len(topic) - len(tail)]
        return node if node and "/" not in node else None

    @property
    def jobs(self) -> str:
        """Where submitters publish scene jobs, ``<prefix>/jobs``."""
        return f"{self.prefix}/{_JOBS}"

    def shared_jobs(self, group: str) -> str:
        """A node's MQTT 5 shared subscription to the jobs, ``$share/<group>/<prefix>/jobs``:
        the broker hands each job to one member of ``group``."""
        return f"$share/{group}/{self.jobs}"

    def replies(self, client_id: str) -> str:
        """Where the nodes answer this fleet client, ``<prefix>-fleet/<client_id>/reply``."""
        return f"{self.prefix}-fleet/{client_id}/reply"
