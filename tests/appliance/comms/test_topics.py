"""Topic names come from one place and parse back."""

from __future__ import annotations

from appliance.comms.topics import RETRIEVAL_QUERY, FleetTopics, Topics

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


def test_response_topics_that_would_aim_a_reply_at_the_appliance_are_refused() -> None:
    ok = ("replies/me", "clients/abc/reply", "terratile-other/x", "a b/ü")
    for topic in ok:
        assert T.response_topic_problem(topic, 256) is None, topic
    bad = {"terratile/edge-01/cmd/adapt": "inside", "terratile/edge-01/available": "inside",
           "terratile/edge-01/scene/s/result": "inside", "terratile/other/cmd/reload": "inside",
           "terratile": "inside", "replies/+": "wildcard", "replies/#": "wildcard",
           "a\x00b": "control", "$SYS/x": "$", "": "empty", "x" * 257: "longer",
           "\ud800": "UTF-8"}
    for topic, why in bad.items():
        problem = T.response_topic_problem(topic, 256)
        assert problem is not None and why in problem, (topic[:20], problem)


def test_fleet_topics_span_every_node_and_reply_outside_the_tree() -> None:
    fleet = FleetTopics("terratile")
    assert fleet.every("status") == "terratile/+/status"
    assert fleet.of("edge-01") == T
    assert fleet.sender("terratile/edge-01/status", "status") == "edge-01"
    assert fleet.sender("terratile/edge-01/events/model", "events/model") == "edge-01"
    for other in ("terratile/a/b/status", "terratile//status", "elsewhere/edge-01/status",
                  "terratile/edge-01/available"):
        assert fleet.sender(other, "status") is None, other
    reply = fleet.replies("cli-1")
    assert T.response_topic_problem(reply, 256) is None  # a node will answer there
