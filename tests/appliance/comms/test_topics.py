"""Topic names come from one place and parse back."""

from __future__ import annotations

from appliance.comms.topics import RETRIEVAL_QUERY, Topics

T = Topics("terratile", "edge-01")


def test_node_scene_and_command_topics() -> None:
    assert T.node("status") == "terratile/edge-01/status"
    assert T.scene("ab", "result") == "terratile/edge-01/scene/ab/result"
    assert T.commands == "terratile/edge-01/cmd/+"
    assert T.verb(T.command("rollback")) == "rollback"
    assert T.verb("terratile/edge-01/status") is None
    assert T.verb("terratile/other/cmd/rollback") is None


def test_reply_topics_for_clients_without_a_response_topic() -> None:
    assert T.response(RETRIEVAL_QUERY, "q1") == "terratile/edge-01/retrieval/response/q1"
    assert T.response(RETRIEVAL_QUERY, None) == "terratile/edge-01/retrieval/response"
