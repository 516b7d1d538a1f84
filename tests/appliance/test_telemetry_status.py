"""Honest status (real mosquitto, a real daemon): the retained status is built when it is
published, so it says the queue emptied; with the broker down the box says so (a repeated
WARNING with the attempts and the results waiting, ``degraded: mqtt`` in
``terratile status``), and recovers by itself."""

from __future__ import annotations

import itertools
import json
import logging
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from appliance.cli.main import app as cli
from appliance.comms.message import Message
from appliance.comms.mqtt import Comms
from appliance.config import MQTTConfig
from appliance.ingest.journal import Journal
from tests.conftest import Broker, free_port
from tests.helpers.daemon import DaemonProc, P
from tests.helpers.mqtt_listener import Listener
from tests.helpers.scenes import write_scene


@pytest.fixture()
def daemon(tmp_path: Path, colour_bundle: Path, broker: Broker) -> Iterator[DaemonProc]:
    d = DaemonProc(tmp_path / "box", colour_bundle, broker.port, adapt={"enabled": False})
    yield d
    if d.proc is not None:
        d.kill()


def cli_status(daemon: DaemonProc) -> dict[str, object]:
    out = CliRunner().invoke(cli, ["status", "--config", str(daemon.config)])
    assert out.exit_code == 0, out.output
    loaded = json.loads(out.stdout)
    assert isinstance(loaded, dict)
    return loaded


def test_the_retained_status_after_the_queue_empties_says_so(
        daemon: DaemonProc, broker: Broker, tmp_path: Path) -> None:
    scenes = [write_scene(tmp_path / f"s{i}.tif", size=(128, 128), offset=float(i))
              for i in range(4)]
    listener = Listener(broker.port, f"{P}/#")
    daemon.start()
    for scene in scenes:
        daemon.drop(scene)
    listener.wait_for(lambda m: m.topic.endswith("/result"), count=4)

    def settled() -> bool:
        statuses = listener.matching(lambda m: m.topic == f"{P}/status")
        last = json.loads(statuses[-1].payload) if statuses else {}
        return bool(last.get("queue_depth") == 0 and last.get("outbox_depth") == 0
                    and last.get("state") == "ready")
    daemon.wait(settled, "a status with the queue empty: last "
                + str([m.payload[:400] for m in listener.matching(
                    lambda m: m.topic == f"{P}/status")][-3:]))
    listener.close()
    late = Listener(broker.port, f"{P}/status")  # joins later: gets the retained one
    retained = json.loads(late.wait_for(lambda m: m.topic == f"{P}/status")[0].payload)
    late.close()
    assert retained["state"] == "ready" and retained["queue_depth"] == 0
    assert retained["counts"].get("done") == 4 and retained["outbox_depth"] == 0
    assert retained["mqtt"]["connected"] is True and retained["degraded"] == []
    status = cli_status(daemon)
    assert status["queue_depth"] == 0
    assert isinstance(status["daemon"], dict) and status["daemon"]["degraded"] == []
    assert daemon.terminate() == 0
    assert cli_status(daemon)["daemon"] is None  # no daemon runs now


def test_broker_down_is_a_warning_with_the_count_waiting_and_degraded_status(
        daemon: DaemonProc, broker: Broker, tmp_path: Path) -> None:
    daemon.start()
    broker.stop()
    for i in range(2):
        daemon.drop(write_scene(tmp_path / f"d{i}.tif", size=(128, 128), offset=float(i)))
    daemon.wait(lambda: len(daemon.outbox_topics()) == 2, "two results in the outbox")
    pattern = re.compile(rb"WARNING .*MQTT: broker 127\.0\.0\.1:\d+ unreachable for \d+ s "
                         rb"\((\d+) failed attempts.*\); 2 message\(s\) waiting in the outbox")
    daemon.wait(lambda: pattern.search(daemon.log.read_bytes()) is not None,
                "the broker-down warning with 2 waiting", timeout=60)

    def degraded() -> bool:
        d = cli_status(daemon)["daemon"]
        return isinstance(d, dict) and d.get("degraded") == ["mqtt"] and d["outbox_depth"] == 2
    daemon.wait(degraded, "degraded: mqtt in terratile status")
    out = CliRunner().invoke(cli, ["status", "--config", str(daemon.config)])
    assert "WARNING: the daemon is degraded: mqtt" in out.stderr
    link = json.loads(out.stdout)["daemon"]["mqtt"]
    assert link["connected"] is False and link["attempts"] >= 1 and link["error"]
    broker.start()  # same port: the box reconnects and sends what waited (the broker's
    # PUBACKs empty the outbox; a subscriber that joins now could miss them, so ask the box)
    daemon.wait(lambda: daemon.outbox_topics() == [], "the outbox sent", timeout=60)
    listener = Listener(broker.port, f"{P}/#")
    daemon.wait(lambda: cli_status(daemon)["daemon"]["degraded"] == [],  # type: ignore[index]
                "healthy again")
    retained = listener.wait_for(lambda m: m.topic == f"{P}/status"
                                 and json.loads(m.payload)["outbox_depth"] == 0)
    assert json.loads(retained[-1].payload)["degraded"] == []
    listener.close()


def test_the_broker_down_warning_repeats_with_backoff(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    journal = Journal(tmp_path / "journal.sqlite")
    journal.enqueue(Message("m1", f"{P}/scene/x/result", "{}"))
    comms = Comms(MQTTConfig(port=free_port(), reconnect_max_delay=1, down_warning_seconds=0.5),
                  "edge-t", journal, lambda: "{}")
    with caplog.at_level(logging.WARNING, logger="appliance.comms.mqtt"):
        comms.start()
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                warnings = [r for r in caplog.records if "unreachable for" in r.getMessage()]
                if len(warnings) >= 4:
                    break
                time.sleep(0.1)
        finally:
            comms.stop(drain_seconds=0)
            journal.close()
    assert len(warnings) >= 4, caplog.text
    assert all("1 message(s) waiting" in r.getMessage() for r in warnings)
    gaps = [b.created - a.created for a, b in itertools.pairwise(warnings)]
    assert gaps[1] >= 0.9 and gaps[2] >= 1.9 and gaps[2] > gaps[0], gaps  # 0.5, 1, 2 s …
    assert comms.connection().connected is False and comms.connection().attempts >= 2
