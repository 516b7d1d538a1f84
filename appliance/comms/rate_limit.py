"""A per-client request rate limit: one token bucket for each client the box can tell apart.

An MQTT subscriber never learns who published a message, so the box names a client by
where its reply goes: the MQTT 5 response topic (each client subscribes to its own), or
one shared name for MQTT 3.1.1 clients, whose reply topic is only known after parsing.
A client that floods on its own reply topic is held to ``rate`` requests per second (with
``burst`` at once) while other clients keep being answered. A hostile client that forges
other reply topics is not held by this alone; the bounded request queue (``busy``) and
the separate command path keep the box responsive then, and broker ACLs that confine each
client's topics are what name it for real.

The table of buckets is bounded (least recently seen clients are forgotten first), so
rotating reply topics cannot grow memory.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

MAX_CLIENTS = 4096


@dataclass
class _Bucket:
    tokens: float
    seen: float


class ClientRateLimit:
    """``allow(client)`` is true while ``client`` stays within ``rate``/s and ``burst``."""

    def __init__(self, rate: float, burst: int, max_clients: int = MAX_CLIENTS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = burst
        self.max_clients = max_clients
        self._clock = clock
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()
        self._lock = threading.Lock()

    def allow(self, client: str) -> bool:
        """Take one token from ``client``'s bucket; false when it has none left."""
        now = self._clock()
        with self._lock:
            bucket = self._buckets.pop(client, None)
            if bucket is None:
                bucket = _Bucket(float(self.burst), now)
            bucket.tokens = min(float(self.burst),
                                bucket.tokens + (now - bucket.seen) * self.rate)
            bucket.seen = now
            self._buckets[client] = bucket
            while len(self._buckets) > self.max_clients:
                self._buckets.popitem(last=False)
            if bucket.tokens < 1.0:
                return False
            bucket.tokens -= 1.0
            return True

    def clients(self) -> int:
        """How many clients are remembered now."""
        with self._lock:
            return len(self._buckets)
