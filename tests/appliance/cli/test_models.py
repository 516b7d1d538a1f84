"""``terratile models``: list, adapt, rollback (byte for byte) and activate."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import yaml
from typer.testing import CliRunner

from appliance.adapt.adapter import Adapter
from appliance.cli.main import app
from appliance.config import load_settings
from appliance.contract.bundle import load_bundle
from appliance.model.runtime import ModelRuntime, ProviderPlan
from appliance.model.store import ModelStore
from tests.helpers.colour_scenes import BLUE_CAST, colour_scene

runner = CliRunner()


def _config(tmp_path: Path) -> Path:
    path = tmp_path / "terratile.yaml"
    path.write_text(yaml.safe_dump({
        "paths": {"state": "state", "inbox": "inbox", "outbox": "outbox", "failed": "failed"},
        "model": {"providers": ["cpu"]},
        "adapt": {"min_samples": 20, "store_max_cells": 1000},
    }))
    return path


def _tree_sha(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.iterdir()) if p.is_file()}


def _seeded(colour_bundle: Path, tmp_path: Path) -> tuple[Path, ModelStore]:
    config = _config(tmp_path)
    store = ModelStore(load_settings(config).paths.state / "models")
    store.install(colour_bundle)
    runtime = ModelRuntime(store.active(), ProviderPlan(providers=("cpu",)))
    settings = load_settings(config)
    adapter = Adapter(store, settings.adapt, settings.paths.state, settings.tiling)
    for seed in range(6):
        adapter.collect(colour_scene(runtime, 500 + seed, BLUE_CAST)[0], runtime.bundle)
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
    assert [r["domains"] for r in rows] == [[], ["adapted"]]  # the input step's expert

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
