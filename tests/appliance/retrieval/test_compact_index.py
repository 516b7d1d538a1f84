"""The compact index: IVF over scalar-quantised codes re-ranked from the log's float16 vectors (real
faiss, real SQLite): recall against exact search, the float16 round trip, migration of the
earlier float32 layout, rebuild without a checkpoint, lists that grow with the index."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest

from appliance.config import RetrievalConfig
from appliance.retrieval.entry_log import Entry, EntryLog
from appliance.retrieval.index import DB_NAME, FAISS_NAME, TileIndex
from appliance.retrieval.vector_index import (
    VectorIndex,
    build,
    desired_kind,
    exact_search,
    faiss_dim,
    ivf_lists,
    make_index,
)

DIM = 24  # not a multiple of 16: IVF-SQ pads it to 32


def cfg(**kw: object) -> RetrievalConfig:
    return RetrievalConfig.model_validate(kw)


def clustered(rng: np.random.Generator, n: int, clusters: int = 40) -> np.ndarray:
    """Unit vectors around random centres: neighbours are close, as real embeddings'."""
    centres = rng.normal(size=(clusters, DIM))
    x = centres[rng.integers(0, clusters, n)] + 0.35 * rng.normal(size=(n, DIM))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def fill(index: TileIndex, vectors: np.ndarray, name: str = "s", per_scene: int = 500) -> None:
    for start in range(0, len(vectors), per_scene):
        part, scene = vectors[start:start + per_scene], f"{name}{start}"
        index.replace([scene], [Entry(scene_id=scene, source="x")] * len(part), part)


def recall_at_10(index: TileIndex, queries: np.ndarray, vectors: np.ndarray) -> float:
    _, truth = exact_search(queries, vectors, np.arange(1, len(vectors) + 1), 10)
    got = [[h.id for h in hits] for hits in index.search_batch(queries, 10)]
    return float(np.mean([len(set(t) & set(g)) / 10 for t, g in zip(truth, got, strict=True)]))


def test_auto_kinds_by_size_end_in_ivfsq() -> None:
    auto = cfg(exact_max=100, hnsw_max=1000)
    assert [desired_kind(auto, n, "flat") for n in (100, 101, 1000)] == ["flat", "hnsw", "hnsw"]
    assert desired_kind(auto, 1001, "hnsw") == "ivfsq"
    assert desired_kind(auto, 600, "ivfsq") == "ivfsq"  # stays down to half of hnsw_max
    assert desired_kind(auto, 500, "ivfsq") == "hnsw"
    assert desired_kind(auto, 40, "ivfsq") == "flat"
    assert desired_kind(cfg(exact_max=100, index_type="ivfsq"), 101, "flat") == "ivfsq"


def test_ivfsq_recall_against_exact_search_and_its_recorded_check(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    vectors, queries = clustered(rng, 6000), clustered(rng, 100)
    index = TileIndex(tmp_path, cfg(exact_max=1000, index_type="ivfsq", ivf_nprobe=16), DIM)
    fill(index, vectors)
    assert index.kind == "ivfsq"
    assert recall_at_10(index, queries, vectors) >= 0.95
    check = index.stats()["recall_check"]
    assert check["type"] == "ivfsq" and check["recall_at_10"] >= 0.95
    index.close()
    # 4-bit codes alone rank far worse: the exact re-ranking is what makes the recall.
    ids = np.arange(1, len(vectors) + 1, dtype=np.int64)
    alone = build("ivfsq", DIM, cfg(ivf_nprobe=16, sq_bits=4), [(ids, vectors)],
                  train=vectors).index
    _, truth = exact_search(queries, vectors, ids, 10)
    for exact, low, high in ((None, 0.0, 0.9), (lambda i: vectors[i - 1], 0.95, 1.0)):
        _, got = alone.search(queries, 10, exact=exact)
        recall = np.mean([len(set(t) & set(g)) / 10 for t, g in zip(truth, got, strict=True)])
        assert low <= recall <= high


def test_ivfsq_checkpoint_reads_back_padded_and_removes_ids(tmp_path: Path) -> None:
    vectors = clustered(np.random.default_rng(1), 800)
    c = cfg(ivf_nlist=8)
    ids = np.arange(1, 801, dtype=np.int64)
    built = build("ivfsq", DIM, c, [(ids, vectors)], train=vectors)
    assert built.index.kind == "ivfsq" and built.index.nlist == 8
    built.index.write(tmp_path / FAISS_NAME)
    back = VectorIndex.read(tmp_path / FAISS_NAME, DIM, c)
    assert back is not None and back.kind == "ivfsq" and back.ntotal == 800
    assert sorted(back.live_ids().tolist()) == ids.tolist() and back.max_id == 800
    assert VectorIndex.read(tmp_path / FAISS_NAME, 40, c) is None  # 40 pads to 48, not 32
    back.remove(np.asarray([5, 6], np.int64))  # IVF removes at once, no tombstones
    assert back.ntotal == 798 and not back.tombstones
    _, found = back.search(vectors[4:6], 3, exact=lambda i: vectors[i - 1])
    assert not {5, 6} & set(found.ravel().tolist())
    assert faiss_dim("ivfsq", DIM) == 32 and faiss_dim("hnsw", DIM) == DIM
    with pytest.raises(ValueError, match="training vectors"):
        make_index("ivfsq", DIM, c)


def test_float16_round_trip_and_a_vector_goes_with_its_entry(tmp_path: Path) -> None:
    log = EntryLog(tmp_path / DB_NAME, DIM)
    vectors = clustered(np.random.default_rng(2), 3)
    _, new = log.replace(["a"], [Entry(scene_id="a", source="x")] * 3, vectors, 0.0)
    half = vectors.astype(np.float16)
    assert np.array_equal(log.vectors(new), half.astype(np.float32))
    assert np.abs(log.vector(int(new[0])) - vectors[0]).max() < 1e-3
    db = sqlite3.connect(tmp_path / DB_NAME)
    blobs = dict(db.execute("SELECT id, vector FROM vectors").fetchall())
    assert blobs[int(new[1])] == half[1].tobytes() and len(blobs[int(new[1])]) == 2 * DIM
    log.replace(["a"], [], np.zeros((0, DIM), np.float32), 0.0)  # deletes the rows ...
    assert db.execute("SELECT COUNT(*) FROM vectors").fetchone()[0] == 0  # ... and vectors
    with pytest.raises(KeyError):
        log.vectors(new)
    log.close()
    db.close()


OLD_SCHEMA = """
CREATE TABLE entries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    scene_id TEXT NOT NULL, source TEXT NOT NULL,
    col INTEGER, row INTEGER, width INTEGER, height INTEGER, crs TEXT,
    minx REAL, miny REAL, maxx REAL, maxy REAL,
    lon_min REAL, lat_min REAL, lon_max REAL, lat_max REAL,
    class TEXT, confidence REAL, label TEXT, ts REAL NOT NULL,
    vector BLOB NOT NULL
);
CREATE INDEX entries_scene ON entries(scene_id);
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


def test_an_index_of_the_float32_layout_is_migrated(tmp_path: Path) -> None:
    """A state folder written before the float16 table: float32 vectors in ``entries`` and
    an HNSW checkpoint. Opening it moves the vectors, keeps every id, and the index (now
    IVF-SQ by size) finds each entry."""
    rng = np.random.default_rng(3)
    vectors = clustered(rng, 1200)
    db = sqlite3.connect(tmp_path / DB_NAME)
    db.executescript(OLD_SCHEMA)
    db.executemany("INSERT INTO entries (scene_id, source, class, ts, vector) "
                   "VALUES (?, 'x.tif', 'urban', 1.0, ?)",
                   [(f"s{i // 100}", v.tobytes()) for i, v in enumerate(vectors)])
    db.execute("DELETE FROM entries WHERE id <= 100")  # a replaced scene: ids 1..100 gone
    db.execute("""INSERT INTO meta VALUES ('dim', '24')""")
    db.commit()
    db.close()
    old = build("hnsw", DIM, cfg(), [(np.arange(101, 1201, dtype=np.int64), vectors[100:])])
    old.index.write(tmp_path / FAISS_NAME)

    index = TileIndex(tmp_path, cfg(exact_max=200, hnsw_max=500, ivf_nprobe=8), DIM)
    assert index.count() == 1100 and index.kind == "ivfsq"
    columns = {r[1] for r in sqlite3.connect(tmp_path / DB_NAME).execute(
        "PRAGMA table_info(entries)")}
    assert "vector" not in columns and "class" in columns
    assert np.array_equal(index.vector(101), vectors[100].astype(np.float16).astype(np.float32))
    hits = index.search_batch(vectors[100:150], 1)
    assert [h[0].id for h in hits] == list(range(101, 151))
    assert hits[0][0].entry.class_name == "urban" and hits[0][0].entry.scene_id == "s1"
    assert index.stats()["checkpoint"]["kind"] == "ivfsq"
    index.close()


def test_deleting_the_faiss_file_rebuilds_the_same_index_from_the_log(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    vectors, queries = clustered(rng, 3000), clustered(rng, 30)
    c = cfg(exact_max=500, index_type="ivfsq", ivf_nprobe=16)
    index = TileIndex(tmp_path, c, DIM)
    fill(index, vectors)
    index.replace(["s0"], [], np.zeros((0, DIM), np.float32))  # ids 1..500 gone
    assert recall_at_10(index, queries, vectors) < 0.95  # what was deleted is not found
    kept = vectors[500:]
    index.close()
    (tmp_path / FAISS_NAME).unlink()
    again = TileIndex(tmp_path, c, DIM)
    assert again.kind == "ivfsq" and again.stats()["faiss_ntotal"] == again.count() == 2500
    _, truth = exact_search(queries, kept, np.arange(501, 3001), 10)
    got = [[h.id for h in hits] for hits in again.search_batch(queries, 10)]
    assert np.mean([len(set(t) & set(g)) / 10 for t, g in zip(truth, got, strict=True)]) >= 0.95
    assert (tmp_path / FAISS_NAME).is_file()  # the rebuild wrote a checkpoint
    again.close()


def test_lists_grow_with_the_index_and_codes_follow_the_settings(tmp_path: Path) -> None:
    """``ivf_nlist`` unset: 2·√n lists; four times the vectors rebuild with twice as many.
    Reopened with other ``sq_bits``, the checkpoint is rebuilt with codes of that size."""
    rng = np.random.default_rng(5)
    index = TileIndex(tmp_path, cfg(exact_max=100, index_type="ivfsq"), DIM)
    fill(index, clustered(rng, 1000))
    first = index._faiss.nlist
    assert first == ivf_lists(index.cfg, 1000) == 1000 // 39  # capped by the training set
    rebuilt = index.stats()["recall_check"]["at"]
    fill(index, clustered(rng, 200), name="u")  # 1200: not twice the lists yet, no rebuild
    assert index._faiss.nlist == first and index.stats()["recall_check"]["at"] == rebuilt
    fill(index, clustered(rng, 3300), name="t")
    assert index._faiss.nlist == ivf_lists(index.cfg, 4500) >= 2 * first
    assert index.stats()["faiss_ntotal"] == index.count() == 4500
    index.close()
    six_bit = (tmp_path / FAISS_NAME).stat().st_size
    assert six_bit > 4500 * 24  # 3/4 byte per padded dimension (sq_bits 6, the default)
    four = TileIndex(tmp_path, cfg(exact_max=100, index_type="ivfsq", sq_bits=4), DIM)
    assert four.stats()["faiss_ntotal"] == 4500  # other codes: rebuilt from the log
    assert (tmp_path / FAISS_NAME).stat().st_size < six_bit - 4500 * 7  # a quarter byte less
    four.close()
