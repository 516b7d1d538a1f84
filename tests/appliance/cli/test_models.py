"""``terratile models``: list, adapt, rollback (byte for byte) and activate."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import yaml
from typer.testing import CliRunner

from appliance.adapt.adapter import Adapter
from appliance.app import App
from appliance.cli.main import app
from appliance.config import load_settings
from appliance.contract.bundle import load_bundle
from appliance.contract.durable import StateLock
from appliance.model.runtime import ModelRuntime, ProviderPlan
from appliance.model.store import ModelStore
from tests.helpers.colour_scenes import BLUE_CAST, colour_scene

runner = CliRunner()


def _config(tmp_path: Path, fusion: str = "mean") -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "terratile.yaml"
    path.write_text(yaml.safe_dump({
        "paths": {"state": "state", "inbox": "inbox", "results": "results", "failed": "failed"},
        "model": {"providers": ["cpu"], "warmup": False},
        "tiling": {"fusion": fusion},
        "adapt": {"min_samples": 20, "store_max_cells": 1000},
        "mqtt": {"enabled": False},
    }))
    return path


def _tree_sha(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.iterdir()) if p.is_file()}


def _seeded(colour_bundle: Path, tmp_path: Path, fusion: str = "mean"
            ) -> tuple[Path, ModelStore]:
    """A box whose candidate store holds six colour-cast scenes (as the daemon collects)."""
    config = _config(tmp_path, fusion)
    settings = load_settings(config)
    store = ModelStore.for_settings(settings)
    store.install(colour_bundle)
    bundle = store.active()
    runtime = ModelRuntime(bundle, ProviderPlan(providers=("cpu",)))
    adapter = Adapter(store, settings.adapt, settings.paths.state, settings.tiling)
    for seed in range(6):
        adapter.collect(colour_scene(runtime, 500 + seed, BLUE_CAST)[0], bundle)
    return config, store


def test_adapt_list_rollback_activate(colour_bundle: Path, tmp_path: Path) -> None:
    config, store = _seeded(colour_bundle, tmp_path)
    before = _tree_sha(store.active().path)

    result = runner.invoke(app, ["models", "adapt", "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["action"] == "promoted"

    listed = runner.invoke(app, ["models", "list", "--config", str(config), "--json"])
    assert listed.exit_code == 0, listed.output
    rows = json.loads(listed.output)
    assert [(r["version"], r["parent"], r["active"]) for r in rows] == [(1, None, False),
                                                                        (2, 1, True)]
    assert Path(rows[1]["path"]) == store.dir_for(2)
    assert [r["experts"] for r in rows] == [[], ["adapted"]]  # the input step's expert

    rolled = runner.invoke(app, ["models", "rollback", "--config", str(config)])
    assert rolled.exit_code == 0, rolled.output
    assert "v2 → v1" in rolled.output
    assert store.active_version() == 1
    assert _tree_sha(store.active().path) == before  # byte for byte the bundle it was

    again = runner.invoke(app, ["models", "activate", "2", "--config", str(config)])
    assert again.exit_code == 0 and store.active_version() == 2
    text = runner.invoke(app, ["models", "list", "--config", str(config)])
    assert "* v2" in text.output and "parent v1" in text.output
    assert "experts: adapted" in text.output


def test_errors_are_clear(colour_bundle: Path, tmp_path: Path) -> None:
    config, store = _seeded(colour_bundle, tmp_path)
    missing = runner.invoke(app, ["models", "activate", "7", "--config", str(config)])
    assert missing.exit_code == 1 and "v0007" in missing.output
    no_parent = runner.invoke(app, ["models", "rollback", "--config", str(config)])
    assert no_parent.exit_code == 1 and "no earlier version" in no_parent.output
    assert store.active_version() == 1
    load_bundle(store.dir_for(1))
    bad = tmp_path / "bad.yaml"
    bad.write_text("adapt: {tau: 3}\n")
    invalid = runner.invoke(app, ["models", "list", "--config", str(bad)])
    assert invalid.exit_code == 78 and "adapt.tau" in invalid.output


def test_model_commands_refuse_while_a_daemon_holds_the_state(colour_bundle: Path,
                                                              tmp_path: Path) -> None:
    config, store = _seeded(colour_bundle, tmp_path)
    daemon = StateLock(load_settings(config).paths.state)
    assert daemon.acquire()
    try:
        for args, command in ((["rollback"], "cmd/rollback"), (["adapt"], "cmd/adapt"),
                              (["activate", "1"], 'cmd/activate -m \'{"version": 1}\'')):
            result = runner.invoke(app, ["models", *args, "--config", str(config)])
            assert result.exit_code == 1, result.output
            assert "daemon is running" in result.output and command in result.output
        assert store.active_version() == 1 and [v.version for v in store.versions()] == [1]
    finally:
        daemon.release()


def test_cli_and_daemon_adapt_alike(colour_bundle: Path, tmp_path: Path) -> None:
    """The same stored candidates, adapted by the CLI and by the daemon's own job."""
    config, _ = _seeded(colour_bundle, tmp_path / "cli", fusion="max")
    daemon_config, _ = _seeded(colour_bundle, tmp_path / "daemon", fusion="max")
    by_cli = runner.invoke(app, ["models", "adapt", "--config", str(config)])
    assert by_cli.exit_code == 0, by_cli.output
    node = App(load_settings(daemon_config))
    node.build()
    try:
        by_daemon = node.jobs.run_here("cli") if node.jobs is not None else None
    finally:
        node.stop()
    assert by_daemon is not None
    cli = json.loads(by_cli.output)
    daemon = json.loads(by_daemon.model_dump_json())
    for report in (cli, daemon):  # how long the re-normalisation took is not a result
        report["gate"]["renorm"].pop("seconds")
    assert cli["action"] == daemon["action"] == "promoted"
    assert cli["gate"] == daemon["gate"] and cli["counts"] == daemon["counts"]
    assert cli["domain"] == daemon["domain"] == "adapted"


def test_a_stop_waits_for_a_running_job_and_installs_nothing(colour_bundle: Path,
                                                             tmp_path: Path) -> None:
    """A job still training when the daemon stops is joined, and its proposal dropped
    (no install, no switch handed to the loop); drift proposes it again later."""
    config, store = _seeded(colour_bundle, tmp_path, fusion="max")
    node = App(load_settings(config))
    node.build()
    handed: list[object] = []
    assert node.jobs is not None
    node.jobs.start("drift", handed.append)
    assert node.jobs.running
    node.stop()
    assert not node.job_left_running and not node.jobs.running
    assert handed == [] and [v.version for v in store.versions()] == [1]
    assert not any((store.root / ".candidates").iterdir())
