"""Scatter-gather retrieval: one request to every online node, one merged top-k.

The request is the one ``terratile query`` answers (``appliance.retrieval.query``),
published on each node's ``<p>/retrieval/query`` with the client's own MQTT 5 response
topic and correlation data that names the node, so every reply is matched to the node it
asked. Scores are cosine similarities of L2-normalised embeddings from the same kind of
model, so they compare across nodes: the merged answer is the ``k`` best of all replies,
each result naming its node. A node that does not answer by the deadline is reported as
silent, one that answers with an error as such; the results of the others still stand.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from appliance.comms.topics import RETRIEVAL_QUERY
from appliance.fleet.link import FleetLink, correlation_of
from appliance.retrieval.query import DEFAULT_K, RESPONSE_SCHEMA

FLEET_RESPONSE_SCHEMA = "terratile.fleet-retrieval-response/1"


@dataclass(frozen=True)
class FleetAnswer:
    """The merged answer of a scatter-gather query."""

    request_id: str
    k: int
    asked: list[str]
    results: list[dict[str, Any]]  # each a node's result row plus ``node_id``, best first
    answered: list[str] = field(default_factory=list)
    errors: dict[str, dict[str, Any]] = field(default_factory=dict)  # node → {code, message}
    silent: list[str] = field(default_factory=list)
    took_ms: float = 0.0

    @property
    def partial(self) -> bool:
        """Some node asked did not contribute (silent or answered with an error)."""
        return bool(self.silent or self.errors)

    def as_dict(self) -> dict[str, Any]:
        return {"schema": FLEET_RESPONSE_SCHEMA, "request_id": self.request_id, "k": self.k,
                "asked": self.asked, "answered": self.answered, "silent": self.silent,
                "errors": self.errors, "partial": self.partial, "results": self.results,
                "took_ms": round(self.took_ms, 2)}


def scatter_query(link: FleetLink, nodes: Sequence[str], request: Mapping[str, Any],
                  timeout: float) -> FleetAnswer:
    """Send ``request`` to each of ``nodes`` and merge what comes back within ``timeout`` s.

    ``request`` is a retrieval request object; its ``k`` (the nodes' default when absent)
    is both what each node is asked for and the size of the merged answer."""
    request_id = f"fleet-{uuid.uuid4().hex[:16]}"
    body = json.dumps({**request, "request_id": request_id})
    k = request.get("k", DEFAULT_K)
    by_tag = {uuid.uuid4().bytes: node for node in nodes}
    started = time.monotonic()
    for tag, node in by_tag.items():
        link.publish(link.topics.of(node).node(RETRIEVAL_QUERY), body, correlation=tag)
    rows: list[dict[str, Any]] = []
    answered: list[str] = []
    errors: dict[str, dict[str, Any]] = {}
    waiting = set(by_tag)
    deadline = started + timeout
    while waiting and (msg := link.receive(deadline)) is not None:
        got = correlation_of(msg)
        if got is None or got not in waiting:
            continue  # a late reply to an earlier request, or someone else's
        node = by_tag[got]
        try:
            reply = json.loads(msg.payload)
        except ValueError:
            reply = None
        if not isinstance(reply, dict) or reply.get("schema") != RESPONSE_SCHEMA:
            waiting.discard(got)
            errors[node] = {"code": "bad-reply",
                            "message": f"not a {RESPONSE_SCHEMA} reply"}
            continue
        waiting.discard(got)
        if isinstance(reply.get("error"), dict):
            errors[node] = dict(reply["error"])  # busy, rate-limited, bad-request, ...
            continue
        answered.append(node)
        rows.extend({**row, "node_id": node} for row in reply.get("results", [])
                    if isinstance(row, dict) and isinstance(row.get("score"), int | float))
    rows.sort(key=lambda row: -float(row["score"]))
    limit = k if isinstance(k, int) else DEFAULT_K
    return FleetAnswer(request_id=request_id, k=limit, asked=list(nodes),
                       results=rows[:limit], answered=sorted(answered), errors=errors,
                       silent=sorted(by_tag[t] for t in waiting),
                       took_ms=(time.monotonic() - started) * 1000)
