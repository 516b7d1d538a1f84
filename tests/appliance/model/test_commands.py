"""Model commands from outside: bad payloads are refused and change nothing."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from appliance.config import Settings
from appliance.model.commands import ModelCommands
from appliance.model.host import ModelHost
from appliance.model.store import ModelStore
from tests.helpers.colour_bundle import versioned_copy


@pytest.fixture()
def commands(colour_bundle: Path, tmp_path: Path) -> ModelCommands:
    settings = Settings(paths={"state": tmp_path / "state"}, mqtt={"enabled": False})
    store = ModelStore.for_settings(settings)
    store.install(colour_bundle)
    store.install(versioned_copy(colour_bundle, tmp_path / "v2", 2, 1, head_bias=1.0),
                  activate=False)
    return ModelCommands(ModelHost(store, settings, serve=False))


@pytest.mark.parametrize("payload", [b"", b"not json", b"[2]", b'{"v": 2}',
                                     b'{"version": true}', b'{"version": "2"}',
                                     b'{"version": -1}', b"\xff\xfe"])
def test_a_bad_activate_payload_is_refused(commands: ModelCommands, payload: bytes,
                                           caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR):
        commands.activate(payload)()
    assert "activate refused" in caplog.text
    assert commands.host.bundle.version == 1 and commands.host.store.active_version() == 1


def test_activate_rollback_and_refusals_go_through_the_host(
        commands: ModelCommands, caplog: pytest.LogCaptureFixture) -> None:
    commands.activate(b'{"version": 2}')()
    assert commands.host.store.active_version() == 2
    commands.rollback()()
    assert commands.host.bundle.version == 1
    with caplog.at_level(logging.ERROR):
        commands.activate(b'{"version": 9}')()  # not installed
        commands.rollback()()  # v1 has no earlier version
    assert "activate v9 refused" in caplog.text and "rollback refused" in caplog.text
    assert commands.host.store.active_version() == 1
