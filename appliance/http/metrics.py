"""The node's Prometheus metrics: one registry, owned here, exposed at ``/metrics``.

Most values are read at scrape time from the part that owns them, so they can never lag
behind it: outcome counters and state from the telemetry, failures per reason and the
outbox from the journal, the queue from the inbox, the index size, the drift window, the
running model, the MQTT connection and the free disk. Only what happens once per scene
is pushed, by ``scene_processed``: stage latencies (histograms) and tiles.

Names follow Prometheus conventions (``terratile_`` prefix, base units, ``_total`` for
counters); ``docs/grafana-dashboard.json`` charts them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from appliance.http.health import MB, Health, disk_floor_mb, free_bytes
from appliance.ingest.journal import Journal
from appliance.retrieval.index import TileIndex
from appliance.scene.pipeline import SceneOutcome
from appliance.telemetry import State, Telemetry

STAGE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
                 600.0, 1800.0, 3600.0)


@dataclass(frozen=True)
class Sources:
    """Where the scraped values come from."""

    telemetry: Telemetry
    journal: Journal
    health: Health
    index: TileIndex | None
    mqtt_connected: Callable[[], bool] | None  # None: MQTT is off


class Metrics:
    """The registry, the per-scene instruments, and the collector of live values."""

    def __init__(self, sources: Sources) -> None:
        disable_created_metrics()  # no ``*_created`` series: restarts show in uptime already
        self.registry = CollectorRegistry()
        self.stage_seconds = Histogram(
            "terratile_stage_seconds", "Seconds a scene spent per pipeline stage "
            "(read overlaps infer).", ["stage"], buckets=STAGE_BUCKETS, registry=self.registry)
        self.tiles = Counter("terratile_tiles", "Model inputs run (cells × scales).",
                             registry=self.registry)
        self.tiles_per_second = Gauge("terratile_tiles_per_second",
                                      "Tiles per second of the last processed scene.",
                                      registry=self.registry)
        self.registry.register(_Live(sources))

    def scene_processed(self, outcome: SceneOutcome) -> None:
        """A scene's outputs are written: its stage times and tiles."""
        for stage, seconds in outcome.timings.items():
            self.stage_seconds.labels(stage).observe(seconds)
        self.tiles.inc(outcome.tiles)
        total = outcome.timings.get("total", 0.0)
        if total > 0:
            self.tiles_per_second.set(outcome.tiles / total)

    def exposition(self) -> bytes:
        """The text format Prometheus scrapes."""
        return generate_latest(self.registry)


class _Live(Collector):
    """Values read from their owners at scrape time."""

    def __init__(self, sources: Sources) -> None:
        self.s = sources

    def collect(self) -> Iterator[Metric]:
        s = self.s
        status = s.telemetry.status()
        scenes = CounterMetricFamily("terratile_scenes", "Scenes ended since start, by outcome.",
                                     labels=["outcome"])
        for outcome, key in (("done", "done"), ("failed", "failed"),
                             ("duplicate", "duplicates")):
            scenes.add_metric([outcome], s.telemetry.counters[key])
        yield scenes
        failed = GaugeMetricFamily("terratile_journal_failed_scenes",
                                   "Failed scenes in the journal, by reason.", labels=["reason"])
        for reason, n in sorted(s.journal.failure_reasons().items()):
            failed.add_metric([reason], n)
        yield failed
        journal = GaugeMetricFamily("terratile_journal_scenes", "Scenes in the journal, by state.",
                                    labels=["state"])
        for state, n in status.counts.items():
            journal.add_metric([state], n)
        yield journal
        states = GaugeMetricFamily("terratile_state", "1 for the state the node is in.",
                                   labels=["state"])
        for st in State:
            states.add_metric([st.value], 1.0 if st.value == status.state else 0.0)
        yield states
        yield GaugeMetricFamily("terratile_queue_depth", "Scenes waiting in the inbox or claimed.",
                                value=status.queue_depth)
        yield GaugeMetricFamily("terratile_outbox_depth",
                                "MQTT messages waiting in the outbox for the broker.",
                                value=s.journal.outbox_depth())
        if s.mqtt_connected is not None:
            yield GaugeMetricFamily("terratile_mqtt_connected", "1 while connected to the broker.",
                                    value=1.0 if s.mqtt_connected() else 0.0)
        if s.index is not None:
            yield GaugeMetricFamily("terratile_index_vectors", "Vectors in the retrieval index.",
                                    value=s.index.count())
        if status.model is not None:
            yield GaugeMetricFamily("terratile_model_version", "Version of the running model.",
                                    value=status.model.version)
            info = GaugeMetricFamily("terratile_model_info", "The running model (always 1).",
                                     labels=["name", "version", "providers"])
            info.add_metric([status.model.name, str(status.model.version),
                             ",".join(status.providers)], 1.0)
            yield info
        if status.drift is not None:
            d = status.drift
            yield GaugeMetricFamily("terratile_drifting", "1 while the drift monitor fires.",
                                    value=1.0 if d.drifting else 0.0)
            yield GaugeMetricFamily("terratile_adapting", "1 while an adaptation job runs.",
                                    value=1.0 if d.adapting else 0.0)
            window = GaugeMetricFamily(
                "terratile_drift_score", "Drift scores of the sliding window (medians of PSI and "
                "MMD², Page-Hinkley statistics of the confidence detectors).", labels=["score"])
            for name, value in (("psi", d.window.psi), ("mmd", d.window.mmd),
                                ("ph_max_prob", d.window.ph_max_prob),
                                ("ph_entropy", d.window.ph_entropy)):
                window.add_metric([name], value)
            yield window
        free = GaugeMetricFamily("terratile_disk_free_bytes", "Free bytes on the node's disks.",
                                 labels=["disk"])
        for name, folder in s.health.disks().items():
            try:
                free.add_metric([name], float(free_bytes(folder)))
            except OSError:
                continue
        yield free
        yield GaugeMetricFamily("terratile_disk_floor_bytes",
                                "Free space a scene needs on the results disk.",
                                value=disk_floor_mb(s.health.settings) * MB)
        ready = GaugeMetricFamily("terratile_ready", "1 while /readyz says ready.",
                                  value=1.0 if s.health.readiness().ready else 0.0)
        yield ready
