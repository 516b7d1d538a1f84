"""``terratile fleet submit`` against a real mosquitto, a real daemon taking jobs and a
real nginx serving COGs: progress and a summary, exit 1 when a job failed, a list file,
and a lease that re-submits a job nobody answers."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from appliance.cli.fleet import read_scene_list
from appliance.cli.main import app as cli
from appliance.config import MQTTConfig
from appliance.fleet.link import FleetLink
from appliance.fleet.submit import SceneRequest, submit_jobs
from tests.conftest import Broker
from tests.helpers.daemon import DaemonProc
from tests.helpers.mqtt_listener import Listener
from tests.helpers.range_server import RangeServer, write_cog
from tests.helpers.scenes import write_scene


@pytest.fixture()
def server(tmp_path: Path) -> Iterator[RangeServer]:
    www = tmp_path / "www"
    www.mkdir()
    for i in range(2):
        write_cog(write_scene(tmp_path / f"p{i}.tif", noise=3.0, seed=i), www / f"c{i}.tif")
    with RangeServer(www, tmp_path / "nginx") as s:
        yield s


@pytest.fixture()
def node(tmp_path: Path, colour_bundle: Path, broker: Broker) -> Iterator[DaemonProc]:
    d = DaemonProc(tmp_path / "box", colour_bundle, broker.port, node_id="edge-s",
                   fleet={"enabled": True, "schemes": ["http"], "http_timeout": 5})
    d.start()
    yield d
    if d.proc is not None:
        d.kill()


def test_submit_follows_every_job_and_fails_when_one_fails(
        node: DaemonProc, server: RangeServer, tmp_path: Path, broker: Broker) -> None:
    listing = tmp_path / "scenes.txt"
    listing.write_text(f"# two COGs\n{server.url('c0.tif')}\n\n{server.url('c1.tif')}  # b\n")
    out = CliRunner().invoke(cli, ["fleet", "submit", "--list", str(listing), "--lease", "30",
                                   "--timeout", "60", "--config", str(node.config), "--json"])
    assert out.exit_code == 0, out.output
    report = json.loads(out.stdout)
    assert (report["done"], report["failed"], report["unfinished"]) == (2, 0, 0)
    assert {j["node"] for j in report["jobs"]} == {"edge-s"}
    assert "accepted by edge-s" in out.stderr and "done by edge-s" in out.stderr
    bad = CliRunner().invoke(cli, ["fleet", "submit", server.url("c0.tif"),
                                   server.url("gone.tif"), "--lease", "30", "--timeout", "60",
                                   "--config", str(node.config)])
    assert bad.exit_code == 1
    assert "1 done, 1 failed, 0 unfinished" in bad.stderr
    assert "failed by edge-s (unreachable" in bad.stderr


def test_a_job_nobody_answers_is_resubmitted_each_lease(broker: Broker) -> None:
    jobs = Listener(broker.port, "terratile/jobs")
    with FleetLink(MQTTConfig(port=broker.port)) as link:
        report = submit_jobs(link, [SceneRequest("https://h/a.tif")], lease=1.0, timeout=3.5)
    assert report.count("unfinished") == 1 and not report.complete
    sent = jobs.wait_for(lambda m: True, 3, timeout=5)
    assert len({json.loads(m.payload)["job_id"] for m in sent}) == 1  # the same job each time
    assert report.jobs[0].submissions >= 3


def test_a_backlog_waits_in_the_submitter_beyond_the_window(broker: Broker) -> None:
    jobs = Listener(broker.port, "terratile/jobs")
    backlog = [SceneRequest(f"https://h/{i}.tif") for i in range(5)]
    with FleetLink(MQTTConfig(port=broker.port)) as link:
        report = submit_jobs(link, backlog, lease=1.0, timeout=2.5, window=2)
    sent = jobs.wait_for(lambda m: True, 4, timeout=5)
    assert len({json.loads(m.payload)["job_id"] for m in sent}) == 2  # nobody accepted any
    assert [j.submissions for j in report.jobs][2:] == [0, 0, 0]
    assert report.count("unfinished") == 5


def test_a_scene_list_is_read_with_digests_and_comments(tmp_path: Path) -> None:
    listing = tmp_path / "l.txt"
    listing.write_text(f"s3://b/k.tif {'AB' * 32}\n# nothing\n/data/x.tif\n")
    assert read_scene_list(listing) == [SceneRequest("s3://b/k.tif", "ab" * 32),
                                        SceneRequest("/data/x.tif")]
    listing.write_text("a b c\n")
    with pytest.raises(ValueError, match="line 1"):
        read_scene_list(listing)
