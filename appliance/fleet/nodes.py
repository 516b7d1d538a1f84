"""The fleet's state: every node from its retained ``available`` and ``status``.

Each node keeps two retained messages on the broker: ``<p>/available`` (``online`` while
connected, the broker's last will ``offline`` once it vanishes) and ``<p>/status``, the
``StatusPayload`` of its last change. A new subscriber receives both at once, so the
fleet's state is one subscription away and needs no node to answer. A node that was
killed keeps its last status (it could not update it): ``available`` says it is gone,
the status says what it was doing, and its ``ts`` when it last said so.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from appliance.comms.topics import AVAILABLE, STATUS
from appliance.contract.payloads import StatusPayload
from appliance.fleet.link import FleetLink

READ_TIMEOUT = 10.0


@dataclass(frozen=True)
class NodeView:
    """One node as its retained messages describe it."""

    node_id: str
    available: str | None  # online | offline | None (no retained availability)
    status: StatusPayload | None
    status_error: str | None = None  # why a retained status could not be read

    @property
    def online(self) -> bool:
        return self.available == "online"

    @property
    def last_seen(self) -> str | None:
        """When the node last published its status (UTC, ISO 8601)."""
        return self.status.ts if self.status is not None else None

    def as_dict(self) -> dict[str, Any]:
        """The node as ``fleet status --json`` prints it."""
        s = self.status
        return {
            "node_id": self.node_id, "available": self.available,
            "state": s.state if s else None,
            "model": s.model.model_dump(mode="json") if s and s.model else None,
            "software_version": s.version if s else None,
            "queue_depth": s.queue_depth if s else None,
            "outbox_depth": s.outbox_depth if s else None,
            "degraded": list(s.degraded) if s else None,
            "last_seen": self.last_seen, "status_error": self.status_error,
        }


def read_fleet(link: FleetLink, timeout: float = READ_TIMEOUT) -> list[NodeView]:
    """Every node with a retained ``available`` or ``status`` under the link's prefix,
    sorted by node id. Exact, not timed: it reads until the link's ``sync`` marker comes
    back, after every retained message (``TimeoutError`` if it does not within
    ``timeout`` s)."""
    topics = link.topics
    link.subscribe(topics.every(AVAILABLE), topics.every(STATUS))
    marker = link.sync()
    available: dict[str, str] = {}
    statuses: dict[str, StatusPayload] = {}
    errors: dict[str, str] = {}
    deadline = time.monotonic() + timeout
    while (msg := link.receive(deadline)) is not None:
        if link.is_sync(msg, marker):
            break
        if (node := topics.sender(msg.topic, AVAILABLE)) is not None:
            available[node] = bytes(msg.payload).decode("utf-8", "replace")
        elif (node := topics.sender(msg.topic, STATUS)) is not None:
            try:
                statuses[node] = StatusPayload.model_validate_json(msg.payload)
                errors.pop(node, None)
            except ValidationError as exc:
                errors[node] = f"unreadable status: {exc.error_count()} error(s), first: " \
                               f"{exc.errors()[0]['msg']}"
    else:
        raise TimeoutError(f"the broker did not deliver the retained state within "
                           f"{timeout:.0f} s")
    names = sorted(set(available) | set(statuses) | set(errors))
    return [NodeView(n, available.get(n), statuses.get(n), errors.get(n)) for n in names]
