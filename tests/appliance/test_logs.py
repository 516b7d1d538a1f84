"""Log lines: no timestamp and a syslog priority under journald, JSON on request."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.config import Settings
from appliance.logs import setup_logging, under_journald


@pytest.fixture()
def restore_root() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)


def _log_into(path: Path, settings: Settings) -> list[str]:
    with path.open("w") as stream:
        setup_logging(settings, stream)
        log = logging.getLogger("appliance.test")
        log.info("hello")
        log.error("two\nlines")
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("failed")
        stream.flush()
    return path.read_text().splitlines()


def test_under_journald_no_timestamp_and_a_priority(tmp_path: Path, restore_root: None,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "journal-stream"
    out.touch()
    st = os.stat(out)
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    lines = _log_into(out, Settings())
    assert lines[0] == "<6>INFO appliance.test: hello"
    assert lines[1:3] == ["<3>ERROR appliance.test: two", "<3>lines"]
    assert any(line.startswith("<3>ValueError: boom") for line in lines)
    with (tmp_path / "other").open("w") as other:
        assert not under_journald(other)  # another stream than the journal's


def test_elsewhere_a_timestamp(tmp_path: Path, restore_root: None,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    line = _log_into(tmp_path / "log", Settings())[0]
    assert line.endswith(" INFO appliance.test: hello") and line[:4].isdigit()


def test_json_lines(tmp_path: Path, restore_root: None) -> None:
    lines = _log_into(tmp_path / "log", Settings(logging={"format": "json"}))
    records = [json.loads(line) for line in lines]
    assert len(records) == 3
    assert records[0]["message"] == "hello" and records[0]["level"] == "INFO"
    assert records[0]["logger"] == "appliance.test" and records[0]["ts"].endswith("Z")
    assert records[1]["message"] == "two\nlines"
    assert "ValueError: boom" in records[2]["exc"]
