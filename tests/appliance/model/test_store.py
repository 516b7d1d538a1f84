"""The model store: versions side by side, an atomic active pointer, rollback."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from appliance.contract.bundle import BundleError, Manifest, load_bundle, seal_bundle, sha256_file
from appliance.model.store import ModelStore


def _version(src: Path, dst: Path, version: int, parent: int | None) -> Path:
    shutil.copytree(src, dst)
    manifest = load_bundle(dst).manifest.model_copy(update={"version": version, "parent": parent})
    seal_bundle(dst, manifest)
    return dst


def test_install_activate_rollback(colour_bundle: Path, tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "models")
    with pytest.raises(BundleError, match="no active model"):
        store.active()
    store.install(colour_bundle)
    assert store.active().version == 1
    store.install(colour_bundle)  # same seed again: reused, not duplicated
    assert [v.version for v in store.versions()] == [1]

    v2 = _version(colour_bundle, tmp_path / "v2", 2, 1)
    store.install(v2)
    assert store.active_version() == 2
    listed = {v.version: v for v in store.versions()}
    assert listed[2].active and listed[2].parent == 1 and not listed[1].active

    before = {p.name: sha256_file(p) for p in store.dir_for(1).iterdir()}
    assert store.rollback_target(2) == 1
    assert store.activate(1).version == 1
    after = {p.name: sha256_file(p) for p in store.dir_for(1).iterdir()}
    assert before == after
    with pytest.raises(BundleError, match="no earlier version"):
        store.rollback_target(1)


def test_conflicting_reinstall_and_tampered_version_are_refused(
    colour_bundle: Path, tmp_path: Path
) -> None:
    store = ModelStore(tmp_path / "models")
    store.install(colour_bundle)
    other = _version(colour_bundle, tmp_path / "other", 1, None)
    (other / "reference.json").write_text((other / "reference.json").read_text() + " ")
    seal_bundle(other, Manifest.model_validate_json((other / "manifest.json").read_text()))
    with pytest.raises(BundleError, match="already installed with different files"):
        store.install(other)
    # Tampering with an installed version makes activation refuse it.
    v2 = store.install(_version(colour_bundle, tmp_path / "v2", 2, 1), activate=False)
    (v2.path / "classifier.onnx").write_bytes(b"garbage")
    with pytest.raises(BundleError, match="sha256 mismatch"):
        store.activate(2)
    assert store.active_version() == 1



def test_prune_keeps_the_active_lineage_and_the_newest_others(colour_bundle: Path,
                                                              tmp_path: Path) -> None:
    """v1 source; v2..v4 a first adapted lineage (reset away from); v5..v7 the active one."""
    store = ModelStore(tmp_path / "models")
    store.install(colour_bundle)
    parents = {2: 1, 3: 2, 4: 3, 5: 1, 6: 5, 7: 6}
    for version, parent in parents.items():
        store.install(_version(colour_bundle, tmp_path / f"b{version}", version, parent))
    assert store.lineage(7) == [7, 6, 5, 1]
    assert store.prune(keep=1) == [2, 3]  # v4 is the newest other; 7, 6, 5, 1 are needed
    assert [v.version for v in store.versions()] == [1, 4, 5, 6, 7]
    assert store.rollback_target(7) == 6
    assert store.activate(6).version == 6 and store.active().version == 6
    assert store.prune(keep=1) == [4]  # v7, rolled back from, is now the newest other
    assert store.prune(keep=0) == [7]
    assert [v.version for v in store.versions()] == [1, 5, 6]


def test_derive_stages_a_sealed_candidate_and_install_moves_it_in(
        colour_bundle: Path, tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "models")
    source = store.install(colour_bundle)
    extra = tmp_path / "notes.txt"
    extra.write_text("a new file")
    head = tmp_path / "head.onnx"
    head.write_bytes(source.file("classifier.onnx").read_bytes())
    path = store.derive(source, {"notes.txt": extra, "classifier.onnx": head},
                        {"notes": "derived", "metrics": {"x": 1}})
    assert path.parent == store.root / ".candidates"
    candidate = load_bundle(path)  # sealed: every file verifies
    assert (candidate.version, candidate.manifest.parent) == (2, 1)
    assert candidate.manifest.notes == "derived" and candidate.manifest.metrics == {"x": 1}
    assert "notes.txt" in candidate.manifest.files
    assert candidate.manifest.created > source.manifest.created
    assert store.active_version() == 1 and [v.version for v in store.versions()] == [1]
    installed = store.install(path, activate=False)
    assert installed.path == store.dir_for(2) and not path.exists()
    assert store.active_version() == 1 and (installed.path / "notes.txt").is_file()


def test_discard_and_cleanup_remove_only_staged_candidates(colour_bundle: Path,
                                                           tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "models")
    source = store.install(colour_bundle)
    mine = store.derive(source)
    store.cleanup()
    assert mine.is_dir()  # this process is alive: its candidate stays
    dead = store.staging / "v0002-999999999-left"  # a pid no process can have
    shutil.copytree(mine, dead)
    (store.root / ".tmp-half").mkdir()
    store.cleanup()
    assert not dead.exists() and not (store.root / ".tmp-half").exists() and mine.is_dir()
    store.discard(mine)
    assert not mine.exists()
    with pytest.raises(ValueError, match="not a staged candidate"):
        store.discard(store.dir_for(1))
    assert store.load(1).version == 1
