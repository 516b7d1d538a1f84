"""The per-client token bucket, on a clock the test moves."""

from __future__ import annotations

from appliance.comms.rate_limit import ClientRateLimit


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_client_gets_its_burst_then_its_rate() -> None:
    clock = Clock()
    limit = ClientRateLimit(rate=2.0, burst=3, clock=clock)
    assert [limit.allow("a") for _ in range(4)] == [True, True, True, False]
    clock.now = 0.5  # one token back at 2/s
    assert [limit.allow("a") for _ in range(2)] == [True, False]
    clock.now = 100.0  # never more than the burst, however long it waited
    assert sum(limit.allow("a") for _ in range(10)) == 3


def test_clients_are_counted_apart() -> None:
    limit = ClientRateLimit(rate=1.0, burst=1, clock=Clock())
    assert limit.allow("a") and not limit.allow("a")
    assert limit.allow("b")


def test_rotating_clients_cannot_grow_the_table() -> None:
    limit = ClientRateLimit(rate=1.0, burst=1, max_clients=8, clock=Clock())
    for i in range(1000):
        limit.allow(f"client-{i}")
    assert limit.clients() == 8
