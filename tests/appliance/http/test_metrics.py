"""``/metrics`` scraped from a real daemon and parsed with Prometheus' own text parser."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.appliance.http.conftest import Box
from tests.helpers.paths import REPO
from tests.helpers.scenes import quarters, write_scene


def scrape(box: Box) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of ``/metrics``: (name, sorted labels) → value."""
    reply = box.get("/metrics")
    assert reply.status == 200
    assert reply.headers["content-type"].startswith("text/plain; version=")
    samples = {}
    for family in text_string_to_metric_families(reply.body.decode()):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def test_metrics_follow_scenes_failures_and_the_model(box: Box, tmp_path: Path) -> None:
    before = scrape(box)
    assert before[("terratile_scenes_total", (("outcome", "done"),))] == 0
    assert before[("terratile_model_version", ())] == 2
    assert before[("terratile_model_info", (("name", "colour-test"), ("providers",
                   "CPUExecutionProvider"), ("version", "2")))] == 1
    assert before[("terratile_mqtt_connected", ())] == 1
    assert before[("terratile_state", (("state", "ready"),))] == 1
    assert before[("terratile_ready", ())] == 1
    assert before[("terratile_disk_free_bytes", (("disk", "results"),))] > 0
    assert before[("terratile_index_vectors", ())] == 0

    scene = write_scene(tmp_path / "quarters.tif", size=(128, 128), layout=quarters(128, 128))
    box.daemon.drop(scene)
    (tmp_path / "notes.tif").write_text("not a raster")
    box.daemon.drop(tmp_path / "notes.tif")
    box.wait_done(2)
    box.daemon.drop(scene, "again.tif")  # the same bytes: a duplicate
    box.daemon.wait(lambda: scrape(box)[("terratile_scenes_total",
                                         (("outcome", "duplicate"),))] == 1, "duplicate counted")

    after = scrape(box)
    assert after[("terratile_scenes_total", (("outcome", "done"),))] == 1
    assert after[("terratile_scenes_total", (("outcome", "failed"),))] == 1
    assert after[("terratile_journal_failed_scenes", (("reason", "unreadable"),))] == 1
    assert after[("terratile_journal_scenes", (("state", "done"),))] == 1
    assert after[("terratile_stage_seconds_count", (("stage", "total"),))] == 1
    assert after[("terratile_stage_seconds_sum", (("stage", "infer"),))] > 0
    assert after[("terratile_tiles_total", ())] > 0
    assert after[("terratile_tiles_per_second", ())] > 0
    assert after[("terratile_index_vectors", ())] == 64  # 128² px in 16 px cells
    assert after[("terratile_queue_depth", ())] == 0
    assert ("terratile_drift_score", (("score", "psi"),)) in after
    assert after[("terratile_drifting", ())] in (0, 1)
    assert after[("terratile_adapting", ())] == 0

    # every series the example Grafana dashboard charts is one the node exposes
    grafana = json.loads((REPO / "docs" / "grafana-dashboard.json").read_text())
    charted = {name for panel in grafana["panels"] for target in panel["targets"]
               for name in re.findall(r"terratile_[a-z_]+", target["expr"])}
    exposed = {name for name, _ in after}
    assert charted and charted <= exposed, charted - exposed
