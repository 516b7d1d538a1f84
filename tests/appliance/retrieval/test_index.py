"""TileIndex: the log and faiss together (real SQLite, real faiss): replacement, type changes,
filters, reconciliation after a crash or another writer, a real SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest

from appliance.config import RetrievalConfig, Settings
from appliance.contract.bundle import load_bundle
from appliance.model.runtime import ModelRuntime, ProviderPlan
from appliance.retrieval.entry_log import Entry, Filters, IndexStateError
from appliance.retrieval.index import TileIndex
from appliance.scene.pipeline import process_scene
from tests.helpers.outcomes import CLASSES, DIM, SELF_SCORE_TOL, outcome, unit
from tests.helpers.paths import REPO
from tests.helpers.scenes import quarters, write_scene


def cfg(**kw: object) -> RetrievalConfig:
    return RetrievalConfig.model_validate(kw)


near_one = pytest.approx(1.0, abs=SELF_SCORE_TOL)  # a vector's score against its stored copy


def window_of(index: TileIndex, entry_id: int) -> tuple[int, int, int, int] | None:
    """The window of one entry, as a search with its own stored vector returns it."""
    hits = index.search(index.vector(entry_id), index.count())
    return next(h.entry.window for h in hits if h.id == entry_id)


def test_add_and_search_return_cell_metadata(tmp_path: Path) -> None:
    index = TileIndex(tmp_path, cfg(), DIM)
    out = outcome("s1", seed=1, invalid=(5,))
    assert index.add_scene(out, CLASSES) == 11  # the nodata cell is not indexed
    hits = index.search(out.cells.embeddings[7], 3)
    top = hits[0]
    assert top.score == near_one
    assert top.entry.scene_id == "s1" and top.entry.source == "s1.tif"
    assert top.entry.window == (48, 16, 16, 16)
    assert top.entry.class_name == "vegetation"  # cell 7 → class 7 % 3
    assert top.entry.confidence == pytest.approx(0.9)
    assert top.entry.bounds == tuple(out.cells.bounds[7])
    assert top.entry.bounds_wgs84 == pytest.approx(tuple(out.cells.bounds_wgs84[7]))
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    d = top.as_dict()
    assert {"score", "scene_id", "source", "window", "bounds", "bounds_wgs84", "class",
            "confidence"} <= set(d)
    assert all(h.entry.window != (16, 16, 16, 16) for h in index.search(
        out.cells.embeddings[5], 11))  # the invalid cell's vector was never indexed


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_reprocessing_a_scene_replaces_its_entries(tmp_path: Path, kind: str) -> None:
    index = TileIndex(tmp_path, cfg(exact_max=0 if kind == "hnsw" else 1000), DIM)
    index.add_scene(outcome("other", seed=9), CLASSES)
    first = outcome("s1", seed=1)
    index.add_scene(first, CLASSES)
    assert index.kind == kind
    second = outcome("s1", seed=2)
    index.add_scene(second, CLASSES)
    assert index.count() == 24
    old_ids = set()
    for v in first.cells.embeddings:
        hits = index.search(v, 24)
        assert len(hits) == 24  # every live entry is reachable, none twice
        assert len({h.id for h in hits}) == 24
        old_ids |= {h.id for h in hits if h.score > 0.9999}
    new_top = {index.search(v, 1)[0].id for v in second.cells.embeddings}
    assert len(new_top) == 12 and not (old_ids & new_top)
    index.close()
    reopened = TileIndex(tmp_path, cfg(exact_max=0 if kind == "hnsw" else 1000), DIM)
    assert reopened.count() == 24
    assert {reopened.search(v, 1)[0].id for v in second.cells.embeddings} == new_top


def test_type_change_rebuilds_and_records_recall(tmp_path: Path) -> None:
    index = TileIndex(tmp_path, cfg(exact_max=40), DIM)
    for s in range(3):
        index.add_scene(outcome(f"s{s}", seed=s), CLASSES)
    assert index.kind == "flat"
    for s in range(3, 6):
        index.add_scene(outcome(f"s{s}", seed=s), CLASSES)
    assert index.kind == "hnsw"
    stats = index.stats()
    assert stats["type"] == "hnsw" and stats["entries"] == 72
    assert stats["recall_check"]["type"] == "hnsw"
    assert stats["recall_check"]["recall_at_10"] >= 0.9
    assert stats["checkpoint"]["max_id"] == 48  # written by the rebuild at the change
    assert (tmp_path / "index.faiss").is_file()


def test_ivfpq_above_threshold(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    index = TileIndex(tmp_path, cfg(exact_max=100, index_type="ivfpq", ivf_nlist=8, pq_m=4),
                      DIM)
    vecs = unit(rng, 600)
    index.replace(["bulk"], [Entry(scene_id="bulk", source="x")] * 600, vecs)
    assert index.kind == "ivfpq"
    assert index.stats()["recall_check"]["type"] == "ivfpq"
    assert index.replace(["bulk"], [], np.zeros((0, DIM), np.float32)) == 0
    assert index.count() == 0 and index.search(vecs[0], 5) == []


def test_filters(tmp_path: Path) -> None:
    index = TileIndex(tmp_path, cfg(exact_max=0, filter_exact_max=5), DIM)  # HNSW
    for s in range(4):
        index.add_scene(outcome(f"s{s}", seed=s), CLASSES)
    q = outcome("s0", seed=0).cells.embeddings[0]
    water = index.search(q, 10, Filters(class_name="water"))
    assert len(water) == 10 and {h.entry.class_name for h in water} == {"water"}
    s2 = index.search(q, 20, Filters(scene_id="s2"))
    assert len(s2) == 12 and {h.entry.scene_id for h in s2} == {"s2"}
    both = index.search(q, 20, Filters(scene_id="s3", class_name="urban"))
    assert len(both) == 4  # small allowed set: searched exactly, nothing missed
    now = datetime.now(timezone.utc)
    assert index.search(q, 5, Filters(since=now + timedelta(hours=1))) == []
    assert index.search(q, 5, Filters(until=now - timedelta(hours=1))) == []
    assert len(index.search(q, 5, Filters(since=now - timedelta(hours=1)))) == 5
    top = index.search(q, 1)[0]
    assert top.score == near_one
    assert top.id not in {h.id for h in index.search(q, 5, Filters(exclude_ids=frozenset({
        top.id})))}


def test_find_cell_by_pixel_and_lonlat(tmp_path: Path) -> None:
    index = TileIndex(tmp_path, cfg(), DIM)
    out = outcome("s1", seed=1)
    index.add_scene(out, CLASSES)
    cell = index.find_cell("s1", pixel=(20.0, 17.0))
    assert cell is not None
    assert window_of(index, cell) == (16, 16, 16, 16)
    lon, lat = 10.0 + 40 * 1e-4, 45.0 - 40 * 1e-4  # pixel (40, 40): cell col 32, row 32
    by_lonlat = index.find_cell("s1", lonlat=(lon, lat))
    assert by_lonlat is not None
    assert window_of(index, by_lonlat) == (32, 32, 16, 16)
    assert index.find_cell("s1", pixel=(1000.0, 1000.0)) is None
    assert index.find_cell("nope", pixel=(1.0, 1.0)) is None


def test_dimension_mismatch_is_a_clear_error(tmp_path: Path) -> None:
    TileIndex(tmp_path, cfg(), DIM).close()
    with pytest.raises(IndexStateError, match="8-d embeddings"):
        TileIndex(tmp_path, cfg(), 16)


def test_bad_vectors_are_refused(tmp_path: Path) -> None:
    index = TileIndex(tmp_path, cfg(), DIM)
    bad = np.full((1, DIM), np.nan, np.float32)
    with pytest.raises(ValueError, match="NaN"):
        index.replace(["x"], [Entry(scene_id="x", source="x")], bad)
    with pytest.raises(ValueError, match=r"\[n, 8\]"):
        index.search(np.ones(3, np.float32), 3)
    assert index.count() == 0


def test_restart_replays_entries_added_after_the_checkpoint(tmp_path: Path) -> None:
    index = TileIndex(tmp_path, cfg(checkpoint_every=10_000), DIM)
    index.add_scene(outcome("s0", seed=0), CLASSES)
    index.checkpoint()
    late = outcome("s1", seed=1)
    index.add_scene(late, CLASSES)
    index.add_scene(outcome("s0", seed=5), CLASSES)  # replaces checkpointed entries
    del index  # no close(): the checkpoint lacks s1 and still holds the old s0
    reopened = TileIndex(tmp_path, cfg(), DIM)
    assert reopened.count() == 24 and reopened.stats()["faiss_ntotal"] == 24
    for v in late.cells.embeddings:
        assert reopened.search(v, 1)[0].score == near_one
    assert all(h.entry.scene_id in {"s0", "s1"} for h in reopened.search(late.cells.embeddings[0],
                                                                         24))


def test_corrupt_checkpoint_is_rebuilt_from_the_log(tmp_path: Path) -> None:
    index = TileIndex(tmp_path, cfg(), DIM)
    out = outcome("s0", seed=0)
    index.add_scene(out, CLASSES)
    index.close()
    (tmp_path / "index.faiss").write_bytes(b"not a faiss index")
    reopened = TileIndex(tmp_path, cfg(), DIM)
    assert reopened.search(out.cells.embeddings[3], 1)[0].score == near_one


ADDER = textwrap.dedent("""
    import sys
    from pathlib import Path
    import numpy as np
    from appliance.config import RetrievalConfig
    from appliance.retrieval.entry_log import Entry
    from appliance.retrieval.index import TileIndex
    index = TileIndex(Path(sys.argv[1]), RetrievalConfig(exact_max=150, checkpoint_every=50), 8)
    rng = np.random.default_rng(int(sys.argv[2]))
    for s in range(100000):
        v = rng.normal(size=(20, 8)).astype(np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        index.replace([f"s{s}"], [Entry(scene_id=f"s{s}", source="x")] * 20, v)
        print(s, flush=True)
""")


def test_index_survives_sigkill(tmp_path: Path) -> None:
    """kill -9 an adder mid-stream: every scene it reported committed is searchable."""
    proc = subprocess.Popen([sys.executable, "-c", ADDER, str(tmp_path), "3"], cwd=REPO,
                            stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout is not None
    committed = -1
    while committed < 14:  # past the flat → HNSW change (150) and several checkpoints
        line = proc.stdout.readline()
        assert line, "adder exited early"
        committed = int(line)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # Regenerate what the adder wrote, scene by scene, from the same seed.
    rng = np.random.default_rng(3)
    index = TileIndex(tmp_path, cfg(exact_max=150), DIM)
    assert index.count() >= 20 * (committed + 1)
    assert index.kind == "hnsw"
    for s in range(committed + 1):
        v = rng.normal(size=(20, DIM)).astype(np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        for row in v:
            hits = index.search(row, 1, Filters(scene_id=f"s{s}"))
            assert hits and hits[0].score == near_one
        assert index.search(v[0], 1)[0].entry.scene_id == f"s{s}"
    assert index.stats()["faiss_ntotal"] - index.stats()["tombstones"] == index.count()


def test_real_pipeline_outcome_is_indexed(tmp_path: Path, colour_bundle: Path) -> None:
    bundle = load_bundle(colour_bundle)
    runtime = ModelRuntime(bundle, ProviderPlan(providers=("cpu",)))
    scene = write_scene(tmp_path / "q.tif", size=(64, 64), layout=quarters(64, 64))
    settings = Settings.model_validate({"model": {"providers": ["cpu"]},
                                        "tiling": {"scales": [16, 32], "batch_size": 16}})
    out = process_scene(scene, "ab" * 32, tmp_path / "out", runtime, settings)
    index = TileIndex(tmp_path / "state", settings.retrieval, bundle.manifest.embedding_dim)
    n = index.add_scene(out, bundle.manifest.class_names)
    assert n == int(out.cells.valid.sum()) > 0
    classes = index.stats()["classes"]
    assert set(classes) <= set(bundle.manifest.class_names) and "urban" in classes
    red = out.cells.embeddings[int(np.argmax(out.cells.labels == 0))]
    assert {h.entry.class_name for h in index.search(red, 3)} == {"urban"}
    assert index.add_scene(out, bundle.manifest.class_names) == n
    assert index.count() == n
    # The real cell geometry: a lon/lat inside a cell's WGS84 bounds finds that cell.
    i = int(np.flatnonzero(out.cells.valid)[-1])
    lon0, lat0, lon1, lat1 = out.cells.bounds_wgs84[i]
    cell = index.find_cell("ab" * 32, lonlat=((lon0 + lon1) / 2, (lat0 + lat1) / 2))
    assert cell is not None
    assert window_of(index, cell) == tuple(int(v) for v in out.cells.windows[i])


def test_hnsw_tombstones_are_compacted_by_a_rebuild(tmp_path: Path) -> None:
    index = TileIndex(tmp_path, cfg(exact_max=0, checkpoint_every=1), DIM)
    index.add_scene(outcome("a", seed=1), CLASSES)
    index.add_scene(outcome("b", seed=2), CLASSES)
    again = outcome("a", seed=3)
    index.add_scene(again, CLASSES)  # 12 replaced of 36 > tombstone_rebuild (0.2)
    stats = index.stats()
    assert stats["type"] == "hnsw"
    assert stats["tombstones"] == 0 and stats["faiss_ntotal"] == stats["entries"] == 24
    assert index.search(again.cells.embeddings[0], 1)[0].score == near_one


def test_commits_of_another_process_are_seen(tmp_path: Path) -> None:
    """``terratile index add`` beside a running daemon: each index sees the other's rows."""
    daemon = TileIndex(tmp_path, cfg(exact_max=0), DIM)  # HNSW: replacements are tombstones
    daemon.add_scene(outcome("s0", seed=0), CLASSES)
    cli = TileIndex(tmp_path, cfg(exact_max=0), DIM)
    added = outcome("s1", seed=1)
    cli.add_scene(added, CLASSES)
    cli.add_scene(outcome("s0", seed=2), CLASSES)  # replaces rows the daemon holds
    hit = daemon.search(added.cells.embeddings[4], 1)[0]
    assert hit.entry.scene_id == "s1" and hit.score == near_one
    stats = daemon.stats()
    assert stats["entries"] == 24 and stats["faiss_ntotal"] - stats["tombstones"] == 24
    assert len({h.id for h in daemon.search(added.cells.embeddings[0], 30)}) == 24


def test_a_read_only_index_replays_in_memory_and_never_writes(tmp_path: Path) -> None:
    writer = TileIndex(tmp_path, cfg(checkpoint_every=10_000), DIM)
    out = outcome("s0", seed=0)
    writer.add_scene(out, CLASSES)
    (tmp_path / "index.faiss").unlink()  # as if the writer died before its first checkpoint
    reader = TileIndex(tmp_path, cfg(), DIM, read_only=True)
    assert reader.search(out.cells.embeddings[2], 1)[0].score == near_one
    reader.checkpoint()
    reader.close()
    assert not (tmp_path / "index.faiss").exists()
    with pytest.raises(IndexStateError, match="read-only"):
        reader.replace(["x"], [Entry(scene_id="x", source="x")], unit(np.random.default_rng(0), 1))


def test_a_damaged_index_db_is_moved_aside_and_rebuilt_empty(tmp_path: Path) -> None:
    index = TileIndex(tmp_path, cfg(), DIM)
    index.add_scene(outcome("s1", seed=1), CLASSES)
    index.close()
    db = next(p for p in tmp_path.iterdir() if p.suffix == ".sqlite")
    db.write_bytes(b"not a database at all" * 100)
    again = TileIndex(tmp_path, cfg(), DIM)
    assert again.count() == 0
    assert any(".corrupt-" in p.name for p in tmp_path.iterdir())
    again.add_scene(outcome("s2", seed=2), CLASSES)
    assert again.count() > 0
    again.close()
    db.write_bytes(b"broken again" * 100)
    with pytest.raises(IndexStateError, match="damaged"):
        TileIndex(tmp_path, cfg(), DIM, read_only=True)
