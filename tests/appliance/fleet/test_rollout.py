"""Rollout waves: canaries one at a time, in the order given, then every other node."""

from __future__ import annotations

from appliance.fleet.rollout import waves


def test_canaries_go_alone_then_the_rest_together() -> None:
    nodes = ["b", "a", "c", "d"]
    assert waves(nodes, 1) == [["b"], ["a", "c", "d"]]
    assert waves(nodes, 2) == [["b"], ["a"], ["c", "d"]]
    assert waves(nodes, 0) == [["b", "a", "c", "d"]]
    assert waves(nodes, 4) == [["b"], ["a"], ["c"], ["d"]]
    assert waves(nodes, 9) == [["b"], ["a"], ["c"], ["d"]]
