"""Model rollout: one bundle installed through each node's ``cmd/install``, canaries first.

Each node fetches the bundle itself (``{"source": URL, "sha256": manifest digest,
"activate": true}``), verifies it and switches between scenes; it answers on its
``events/model`` with ``install`` (installed and running) or ``refused`` with the reason.
The rollout goes in waves: each canary node alone, in the order given, then every other
node at once. It stops at the first refusal or a node that does not answer within the
timeout: no later wave is sent, so a bundle that a canary refuses reaches no other node.
The report says, for every node, what happened and which model it runs now.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import ValidationError

from appliance.comms.topics import MODEL_EVENTS
from appliance.contract.payloads import ModelEvent, ModelRef
from appliance.fleet.link import FleetLink

Outcome = Literal["installed", "refused", "timeout", "not-sent"]
INSTALLED_ACTIONS = frozenset({"install", "installed"})


@dataclass(frozen=True)
class NodeRollout:
    """What the rollout did on one node."""

    node_id: str
    outcome: Outcome
    model: ModelRef | None  # what runs there now (as last known)
    reason: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"node_id": self.node_id, "outcome": self.outcome,
                "model": self.model.model_dump(mode="json") if self.model else None,
                "reason": self.reason}


@dataclass(frozen=True)
class RolloutReport:
    """Every target node's outcome, in rollout order; ``stopped`` says why it stopped early."""

    source: str
    nodes: list[NodeRollout]
    stopped: str | None

    @property
    def complete(self) -> bool:
        return all(n.outcome == "installed" for n in self.nodes)

    def as_dict(self) -> dict[str, Any]:
        return {"source": self.source, "complete": self.complete, "stopped": self.stopped,
                "nodes": [n.as_dict() for n in self.nodes]}


def waves(nodes: Sequence[str], canary: int) -> list[list[str]]:
    """The first ``canary`` nodes one by one, then the rest together."""
    head = [[n] for n in nodes[:canary]]
    rest = list(nodes[canary:])
    return head + ([rest] if rest else [])


def roll_out(link: FleetLink, nodes: Sequence[str], current: dict[str, ModelRef | None],
             source: str, sha256: str | None, canary: int, timeout: float) -> RolloutReport:
    """Install ``source`` on ``nodes`` (see the module docstring). ``current`` is each
    node's model before the rollout, reported for the nodes never asked."""
    topics = link.topics
    link.subscribe(topics.every(MODEL_EVENTS))  # before any command: no answer slips past
    command = json.dumps({"source": source, "sha256": sha256, "activate": True})
    done: dict[str, NodeRollout] = {}
    stopped: str | None = None
    for wave in waves(nodes, canary):
        for node in wave:
            link.publish(topics.of(node).command("install"), command)
        done.update(_await_wave(link, wave, current, source, timeout))
        failed = [done[n] for n in wave if done[n].outcome != "installed"]
        if failed:
            first = failed[0]
            stopped = f"{first.node_id}: {first.outcome}" + (
                f" ({first.reason})" if first.reason else "")
            break
    report = [done.get(n) or NodeRollout(n, "not-sent", current.get(n)) for n in nodes]
    return RolloutReport(source, report, stopped)


def _await_wave(link: FleetLink, wave: list[str], current: dict[str, ModelRef | None],
                source: str, timeout: float) -> dict[str, NodeRollout]:
    """Each node's answer to the install of ``source``, or ``timeout`` for the silent."""
    waiting = set(wave)
    out: dict[str, NodeRollout] = {}
    deadline = time.monotonic() + timeout
    while waiting and (msg := link.receive(deadline)) is not None:
        node = link.topics.sender(msg.topic, MODEL_EVENTS)
        if node is None or node not in waiting or msg.retain:
            continue
        try:
            event = ModelEvent.model_validate_json(msg.payload)
        except ValidationError:
            continue  # not an event this client understands; the node is still waiting
        if event.action in INSTALLED_ACTIONS and event.source == source:
            out[node] = NodeRollout(node, "installed", event.model)
        elif event.action == "refused" and event.request == "install" and \
                event.source in (source, None):  # None: refused before reading a source
            out[node] = NodeRollout(node, "refused", event.model, event.reason)
        else:
            continue
        waiting.discard(node)
    for node in waiting:
        out[node] = NodeRollout(node, "timeout", current.get(node),
                                f"no answer within {timeout:.0f} s")
    return out
