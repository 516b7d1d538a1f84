"""Model commands from outside: bad payloads are refused, announced and change nothing."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from appliance.config import Settings
from appliance.model.commands import ModelCommands, ModelNotice
from appliance.model.host import ModelHost
from appliance.model.store import ModelStore
from tests.helpers.colour_bundle import versioned_copy


@pytest.fixture()
def notices() -> list[ModelNotice]:
    return []


@pytest.fixture()
def commands(colour_bundle: Path, tmp_path: Path, notices: list[ModelNotice]) -> ModelCommands:
    settings = Settings(paths={"state": tmp_path / "state"}, mqtt={"enabled": False})
    store = ModelStore.for_settings(settings)
    store.install(colour_bundle)
    store.install(versioned_copy(colour_bundle, tmp_path / "v2", 2, 1, head_bias=1.0),
                  activate=False)
    # The daemon queues tasks on its main loop; here they run at once.
    return ModelCommands(ModelHost(store, settings, serve=False), lambda task: task(),
                         notices.append)


@pytest.mark.parametrize("payload", [b"", b"not json", b"[2]", b'{"v": 2}',
                                     b'{"version": true}', b'{"version": "2"}',
                                     b'{"version": -1}', b"\xff\xfe"])
def test_a_bad_activate_payload_is_refused(commands: ModelCommands, payload: bytes,
                                           notices: list[ModelNotice],
                                           caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR):
        commands.activate(payload)
    assert "activate refused" in caplog.text
    assert [(n.action, n.request) for n in notices] == [("refused", "activate")]
    assert commands.host.bundle.version == 1 and commands.host.store.active_version() == 1


def test_activate_rollback_and_refusals_go_through_the_host(
        commands: ModelCommands, notices: list[ModelNotice],
        caplog: pytest.LogCaptureFixture) -> None:
    commands.activate(b'{"version": 2}')
    assert commands.host.store.active_version() == 2
    commands.rollback()
    assert commands.host.bundle.version == 1 and notices == []
    with caplog.at_level(logging.ERROR):
        commands.activate(b'{"version": 9}')  # not installed
        commands.rollback()  # v1 has no earlier version
    assert "activate refused" in caplog.text and "rollback refused" in caplog.text
    assert [(n.action, n.request) for n in notices] == [("refused", "activate"),
                                                        ("refused", "rollback")]
    assert "v0009" in (notices[0].reason or "") and "no earlier" in (notices[1].reason or "")
    assert commands.host.store.active_version() == 1


def test_a_reload_onto_a_tampered_version_is_refused_and_announced(
        commands: ModelCommands, notices: list[ModelNotice]) -> None:
    """Issue 16, finding 10: the old model keeps running and the refusal is published."""
    store = commands.host.store
    (store.dir_for(2) / "classifier.onnx").write_bytes(b"garbage")
    store.activate(1)
    (store.root / "ACTIVE").write_text('{"version": 2}')  # pointed by hand at the bad one
    commands.reload()
    assert commands.host.bundle.version == 1
    assert notices and notices[0].request == "reload" and "sha256" in (notices[0].reason or "")


@pytest.mark.parametrize("payload", [b"{}", b'{"source": 3}', b'{"source": "/x", "sha256": "ab"}',
                                     b'{"source": "/x", "activate": "yes"}',
                                     b'{"source": "/x", "extra": 1}',
                                     b'{"source": "/x\\u0000y"}'])
def test_a_bad_install_payload_is_refused(commands: ModelCommands, payload: bytes,
                                          notices: list[ModelNotice]) -> None:
    commands.install(payload)
    assert [(n.action, n.request) for n in notices] == [("refused", "install")]
    assert commands.host.store.active_version() == 1
