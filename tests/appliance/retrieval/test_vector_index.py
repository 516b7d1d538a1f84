"""VectorIndex: the faiss half alone: structure choice, builds, tombstones, checkpoints."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pytest

from appliance.config import RetrievalConfig
from appliance.retrieval.vector_index import (
    RecallProbe,
    VectorIndex,
    build,
    desired_kind,
    exact_search,
    make_index,
)
from tests.helpers.outcomes import DIM, unit


def cfg(**kw: object) -> RetrievalConfig:
    return RetrievalConfig.model_validate(kw)


def chunks(vectors: np.ndarray, start: int = 1) -> list[tuple[np.ndarray, np.ndarray]]:
    """The vectors as one (ids, vectors) chunk, ids from ``start``."""
    return [(np.arange(start, start + len(vectors), dtype=np.int64), vectors)]


def test_desired_kind_by_size_with_hysteresis() -> None:
    auto = cfg(exact_max=100)
    assert desired_kind(auto, 100, "flat") == "flat"
    assert desired_kind(auto, 101, "flat") == "hnsw"
    assert desired_kind(auto, 60, "hnsw") == "hnsw"  # stays until half the threshold
    assert desired_kind(auto, 50, "hnsw") == "flat"
    assert desired_kind(auto, 60, "flat") == "flat"
    assert desired_kind(cfg(exact_max=100, index_type="ivfpq"), 101, "flat") == "ivfpq"
    assert desired_kind(cfg(exact_max=0, index_type="flat"), 10**6, "hnsw") == "flat"


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivfpq"])
def test_a_checkpoint_reads_back_as_the_same_kind(kind: str, tmp_path: Path) -> None:
    vectors = unit(np.random.default_rng(0), 400)
    c = cfg(ivf_nlist=4, pq_m=4)
    built = build(kind, DIM, c, chunks(vectors), train=vectors)  # type: ignore[arg-type]
    assert built.index.kind == kind and built.recall is None
    built.index.write(tmp_path / "index.faiss")
    back = VectorIndex.read(tmp_path / "index.faiss", DIM, c)
    assert back is not None and back.kind == kind and back.ntotal == 400
    assert back.max_id == 400 and sorted(back.live_ids().tolist()) == list(range(1, 401))
    assert VectorIndex.read(tmp_path / "index.faiss", 16, c) is None  # another size


def test_missing_or_unreadable_checkpoint_reads_as_none(tmp_path: Path) -> None:
    assert VectorIndex.read(tmp_path / "none.faiss", DIM, cfg()) is None
    (tmp_path / "bad.faiss").write_bytes(b"not a faiss index")
    assert VectorIndex.read(tmp_path / "bad.faiss", DIM, cfg()) is None


def test_hnsw_removal_tombstones_until_overdue() -> None:
    vectors = unit(np.random.default_rng(1), 50)
    index = build("hnsw", DIM, cfg(tombstone_rebuild=0.2), chunks(vectors)).index
    index.remove(np.arange(1, 11, dtype=np.int64))
    assert index.ntotal == 50 and len(index.tombstones) == 10 and not index.overdue
    assert 5 not in index.live_ids() and len(index.live_ids()) == 40
    _, ids = index.search(vectors[:10], 1)
    assert not set(ids.ravel().tolist()) & set(range(1, 11))  # tombstones are never found
    index.remove(np.asarray([11], np.int64))
    assert index.overdue  # 11 > 0.2 * 50


def test_flat_removal_is_immediate() -> None:
    vectors = unit(np.random.default_rng(2), 20)
    index = build("flat", DIM, cfg(), chunks(vectors)).index
    index.remove(np.asarray([3, 4], np.int64))
    assert index.ntotal == 18 and not index.tombstones and not index.overdue
    scores, ids = index.search(vectors[2:3], 20)
    assert 3 not in ids[0] and (ids[0] >= 0).sum() == 18
    assert scores[0][0] < 1 - 1e-6


def test_search_among_allowed_ids_and_exact_search_agree() -> None:
    vectors = unit(np.random.default_rng(3), 300)
    index = build("hnsw", DIM, cfg(), chunks(vectors)).index
    allowed = np.arange(1, 301, 7, dtype=np.int64)
    _, ids = index.search(vectors[:5], 5, allowed)
    assert set(ids.ravel().tolist()) <= set(allowed.tolist())
    scores, exact_ids = exact_search(vectors[:5], vectors[allowed - 1], allowed, 5)
    truth = np.argsort(-(vectors[:5] @ vectors[allowed - 1].T), axis=1)[:, :5]
    assert np.array_equal(exact_ids, allowed[truth])
    assert (np.diff(scores, axis=1) <= 0).all()


def test_build_measures_recall_of_approximate_kinds() -> None:
    vectors = unit(np.random.default_rng(4), 500)
    probe = RecallProbe(vectors[:200], lambda ids: vectors[ids - 1])
    hnsw = build("hnsw", DIM, cfg(), chunks(vectors), probe=probe)
    assert hnsw.recall is not None and 0.9 <= hnsw.recall <= 1.0
    assert build("flat", DIM, cfg(), chunks(vectors), probe=probe).recall is None


def test_ivfpq_needs_training_vectors_and_fits_its_lists() -> None:
    with pytest.raises(ValueError, match="training vectors"):
        make_index("ivfpq", DIM, cfg())
    vectors = unit(np.random.default_rng(5), 300)  # PQ codebooks need 256 training points
    index = make_index("ivfpq", DIM, cfg(ivf_nlist=64, pq_m=3), train=vectors)
    ivf = faiss.downcast_index(index.index)
    assert ivf.nlist == 300 // 39 and ivf.pq.M == 2  # the largest divisor of 8 up to 3
