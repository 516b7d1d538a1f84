"""The model host: one owner of what runs; stage never changes it, switch does, in order."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from appliance.config import Settings
from appliance.contract.bundle import BundleError, read_manifest, seal_bundle
from appliance.model.host import ModelHost, Switch
from appliance.model.store import ModelStore
from tests.helpers.colour_bundle import versioned_copy


def _settings(tmp_path: Path, bundle: Path) -> Settings:
    return Settings(paths={"state": tmp_path / "state", "inbox": tmp_path / "inbox"},
                    model={"bundle": bundle, "providers": ["cpu"], "warmup": False},
                    mqtt={"enabled": False})


@pytest.fixture()
def store_with_v2(colour_bundle: Path, tmp_path: Path) -> tuple[Settings, ModelStore]:
    """v1 (the seed) active, v2 an adapted head installed beside it."""
    settings = _settings(tmp_path, colour_bundle)
    store = ModelStore.for_settings(settings)
    store.install(colour_bundle)
    store.install(versioned_copy(colour_bundle, tmp_path / "v2", 2, 1, head_bias=3.0),
                  activate=False)
    return settings, store


def test_stage_opens_sessions_but_changes_nothing_that_runs(
        store_with_v2: tuple[Settings, ModelStore]) -> None:
    settings, store = store_with_v2
    host = ModelHost(store, settings)
    before = host.runtime.probs(np.ones((1, 8), np.float32))
    staged = host.stage(2)
    assert staged.experts is not None and staged.runtime is None  # same backbone: adopt
    assert store.active_version() == 1 and host.bundle.version == 1
    np.testing.assert_array_equal(host.runtime.probs(np.ones((1, 8), np.float32)), before)


def test_switch_moves_pointer_and_sessions_then_tells_listeners_in_order(
        store_with_v2: tuple[Settings, ModelStore]) -> None:
    settings, store = store_with_v2
    host = ModelHost(store, settings)
    runtime = host.runtime
    heard: list[tuple[str, Switch, int | None, int]] = []
    host.on_switch(lambda c: heard.append(("first", c, store.active_version(),
                                           host.runtime.bundle.version)))
    host.on_switch(lambda c: heard.append(("second", c, store.active_version(),
                                           host.bundle.version)))
    before = runtime.probs(np.ones((1, 8), np.float32))
    change = host.activate(2)
    assert (change.action, change.previous.version, change.bundle.version) == ("activate", 1, 2)
    assert [(h[0], h[2], h[3]) for h in heard] == [("first", 2, 2), ("second", 2, 2)]
    assert host.runtime is runtime  # the backbone session is kept: only the head changed
    assert not np.allclose(host.runtime.probs(np.ones((1, 8), np.float32)), before)


def test_rollback_and_reload_are_switches_too(
        store_with_v2: tuple[Settings, ModelStore]) -> None:
    settings, store = store_with_v2
    host = ModelHost(store, settings)
    host.activate(2)
    assert host.rollback().bundle.version == 1 and store.active_version() == 1
    with pytest.raises(BundleError, match="no earlier version"):
        host.rollback()
    assert host.reload() is None  # the pointer names what runs
    store.activate(2)  # changed by hand
    change = host.reload()
    assert change is not None and change.action == "reload" and host.bundle.version == 2


def test_a_host_without_sessions_only_moves_the_pointer(
        store_with_v2: tuple[Settings, ModelStore]) -> None:
    settings, store = store_with_v2
    host = ModelHost(store, settings, serve=False)
    assert not host.serving
    with pytest.raises(RuntimeError, match="does not serve"):
        _ = host.runtime
    assert host.activate(2).bundle.version == 2 and store.active_version() == 2


def test_a_tampered_version_is_refused_and_the_running_one_stays(
        store_with_v2: tuple[Settings, ModelStore]) -> None:
    settings, store = store_with_v2
    host = ModelHost(store, settings)
    (store.dir_for(2) / "classifier.onnx").write_bytes(b"garbage")
    with pytest.raises(BundleError, match="sha256 mismatch"):
        host.activate(2)
    assert store.active_version() == 1 and host.bundle.version == 1


def test_open_installs_the_seed_bundle_on_first_start(colour_bundle: Path,
                                                      tmp_path: Path) -> None:
    host = ModelHost.open(_settings(tmp_path, colour_bundle), serve=False)
    assert host.bundle.version == 1 and host.store.active_version() == 1


def test_a_tampered_active_version_falls_back_to_the_newest_that_verifies(
        store_with_v2: tuple[Settings, ModelStore], caplog: pytest.LogCaptureFixture) -> None:
    """Issue 16, finding 10: a restart with ACTIVE on a tampered version still serves."""
    settings, store = store_with_v2
    store.activate(2)
    (store.dir_for(2) / "classifier.onnx").write_bytes(b"garbage")
    host = ModelHost(store, settings)
    assert host.bundle.version == 1 and store.active_version() == 1
    assert host.fallback is not None and host.fallback.action == "fallback"
    assert "falling back to v1" in caplog.text
    (store.dir_for(1) / "classifier.onnx").write_bytes(b"garbage")
    with pytest.raises(BundleError):
        ModelHost(store, settings)


def test_an_incompatible_bundle_is_refused_before_any_switch(
        store_with_v2: tuple[Settings, ModelStore], tmp_path: Path) -> None:
    settings, store = store_with_v2
    dim = 6  # the colour bundle's embedding size
    wide = versioned_copy(store.dir_for(1), tmp_path / "v3", 3, None)
    seal_bundle(wide, read_manifest(wide).model_copy(update={"embedding_dim": dim + 1}))
    store.install(wide, activate=False)
    host = ModelHost(store, settings, index_dim=dim)
    with pytest.raises(BundleError, match="does not fit this node: its embeddings have 7"):
        host.activate(3)
    assert store.active_version() == 1 and host.bundle.version == 1
    bands = len(host.bundle.manifest.input.bands)
    narrow = settings.model_copy(update={"input": settings.input.model_copy(
        update={"bands": list(range(1, bands))})})
    with pytest.raises(BundleError, match="bands"):
        ModelHost(store, narrow).stage(2)


def test_the_start_fallback_skips_versions_that_do_not_fit(
        store_with_v2: tuple[Settings, ModelStore], tmp_path: Path) -> None:
    """A tampered ACTIVE falls back past a newer version of another embedding size."""
    settings, store = store_with_v2
    wide = versioned_copy(store.dir_for(1), tmp_path / "v3", 3, None)
    seal_bundle(wide, read_manifest(wide).model_copy(update={"embedding_dim": 7}))
    store.install(wide, activate=False)
    store.activate(2)
    (store.dir_for(2) / "classifier.onnx").write_bytes(b"garbage")
    host = ModelHost(store, settings, index_dim=6)
    assert host.bundle.version == 1 and host.fallback is not None
    assert "sha256 mismatch" in (host.fallback.reason or "")
    # Without an index every verified version fits: the newest (v3) is chosen.
    store.activate(1)
    (store.root / "ACTIVE").write_text('{"version": 2}')
    assert ModelHost(store, settings).bundle.version == 3
