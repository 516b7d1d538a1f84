"""The faiss half of the retrieval index: which structure, how it is built, searched and saved.

Embeddings are L2-normalised, so inner product is cosine. The structure follows the size of
the log and ``retrieval.index_type`` (``desired_kind``): exact ``IndexFlatIP`` up to
``exact_max`` vectors, then HNSW (``auto``/``hnsw``) or IVF-PQ (``ivfpq``). An approximate
index stays until the log shrinks to half the threshold, so a size near it does not make
the index flip back and forth. Every kind sits in an ``IndexIDMap2`` keyed by the entry
log's ids (``retrieval.entry_log``).

``build`` makes a new index from every vector of the log and, when asked, measures its
recall@10 against exact search on a sample of the stored vectors.

HNSW cannot ``remove_ids``. Removed ids become *tombstones*: excluded at query time with an
``IDSelectorNot`` and dropped for good by a rebuild once they exceed
``retrieval.tombstone_rebuild`` of the index (``VectorIndex.overdue``). Flat and IVF
indexes remove ids directly.

A checkpoint (``VectorIndex.write``) goes through the one atomic write, so a crash leaves
the previous checkpoint or the new one, never a torn file; ``read`` reports an unreadable
checkpoint and returns ``None``, and the caller rebuilds from the log.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import faiss as _faiss
import numpy as np

from appliance.config import RetrievalConfig
from appliance.contract.durable import atomic_path

log = logging.getLogger(__name__)

Kind = Literal["flat", "hnsw", "ivfpq"]
RECALL_K = 10
RECALL_QUERIES = 200
# faiss 1.15 switches flat search from its per-query SIMD loop to BLAS when nq * d reaches
# this threshold. Its default (128000) is tuned for many OpenMP threads; on one thread BLAS
# is faster from about 800 on (faiss PR #5109), while a single query (nq * d = d) stays on
# the loop. The effect shows in the flat rows' batch_qps of benchmarks/retrieval.py.
BLAS_THRESHOLD = 800

# The type stubs shipped with faiss lag its 1.15 API (SearchParametersHNSW, IDMap fields).
faiss: Any = _faiss
faiss.cvar.distance_compute_blas_threshold = BLAS_THRESHOLD


def use_threads(n: int) -> None:
    """Run faiss on ``n`` OpenMP threads (0: leave faiss' default); process-wide."""
    if n:
        faiss.omp_set_num_threads(n)


def desired_kind(cfg: RetrievalConfig, n: int, current: Kind) -> Kind:
    """The structure for ``n`` vectors when the index is now ``current``."""
    if cfg.index_type == "flat":
        return "flat"
    approx: Kind = "ivfpq" if cfg.index_type == "ivfpq" else "hnsw"
    if n > cfg.exact_max:
        return approx
    return approx if current == approx and n > cfg.exact_max // 2 else "flat"


class VectorIndex:
    """One faiss index of entry ids and vectors, with its tombstones (see the module)."""

    def __init__(self, index: Any, cfg: RetrievalConfig) -> None:
        self._index = index
        self.cfg = cfg  # read at each search: a changed efSearch/nprobe applies at once
        self.kind = kind_of(index)
        self.tombstones: set[int] = set()

    @classmethod
    def new(cls, kind: Kind, dim: int, cfg: RetrievalConfig,
            train: np.ndarray | None = None) -> VectorIndex:
        """An empty index of ``kind`` (IVF-PQ is trained on ``train``)."""
        return cls(make_index(kind, dim, cfg, train), cfg)

    @classmethod
    def read(cls, path: Path, dim: int, cfg: RetrievalConfig) -> VectorIndex | None:
        """The checkpoint at ``path``; ``None`` if there is none, or none usable for ``dim``."""
        if not path.is_file():
            return None
        try:
            index = faiss.read_index(str(path))
        except RuntimeError as exc:
            log.warning("index: unreadable checkpoint %s (%s); rebuilding from the log",
                        path, exc)
            return None
        return cls(index, cfg) if index.d == dim else None

    def write(self, path: Path) -> None:
        """Save atomically (tombstones are not saved: the caller's log replays them)."""
        with atomic_path(path) as tmp:
            faiss.write_index(self._index, str(tmp))

    @property
    def ntotal(self) -> int:
        """Vectors held, tombstones included."""
        return int(self._index.ntotal)

    @property
    def max_id(self) -> int:
        ids = self._stored_ids()
        return int(ids.max()) if len(ids) else 0

    @property
    def overdue(self) -> bool:
        """True when HNSW tombstones exceed ``tombstone_rebuild`` of the index."""
        return self.kind == "hnsw" and len(self.tombstones) > self.cfg.tombstone_rebuild * max(
            1, self.ntotal)

    def live_ids(self) -> np.ndarray:
        """Ids searchable now: held and not tombstoned."""
        ids = self._stored_ids()
        if self.tombstones:
            gone = np.fromiter(self.tombstones, np.int64, len(self.tombstones))
            ids = np.setdiff1d(ids, gone, assume_unique=True)
        return ids

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        self._index.add_with_ids(vectors, ids)

    def remove(self, ids: np.ndarray) -> None:
        if not len(ids):
            return
        if self.kind == "hnsw":
            self.tombstones.update(int(i) for i in ids)
        else:
            self._index.remove_ids(np.ascontiguousarray(ids, np.int64))

    def search(self, q: np.ndarray, k: int,
               allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """[n,k] scores and ids (-1: none) among ``allowed`` ids, or all but tombstones."""
        if allowed is not None:
            sel: Any = faiss.IDSelectorBatch(allowed)
        elif self.tombstones:
            gone = faiss.IDSelectorBatch(np.fromiter(self.tombstones, np.int64))
            sel = faiss.IDSelectorNot(gone)  # ``gone`` stays referenced until the search ends
        else:
            sel = None
        if self.kind == "hnsw":
            params: Any = faiss.SearchParametersHNSW(
                efSearch=max(self.cfg.hnsw_ef_search, k), sel=sel)
        elif self.kind == "ivfpq":
            params = faiss.SearchParametersIVF(nprobe=self.cfg.ivf_nprobe, sel=sel)
        else:
            params = faiss.SearchParameters(sel=sel)
        scores, ids = self._index.search(q, k, params=params)
        return scores, ids

    def _stored_ids(self) -> np.ndarray:
        return faiss.vector_to_array(self._index.id_map).astype(np.int64)


@dataclass(frozen=True)
class Built:
    """A rebuilt index, how long adding took, and its recall@10 if it was measured."""

    index: VectorIndex
    seconds: float
    recall: float | None


def build(kind: Kind, dim: int, cfg: RetrievalConfig,
          chunks: Iterable[tuple[np.ndarray, np.ndarray]], train: np.ndarray | None = None,
          check_recall: bool = False) -> Built:
    """A new index of ``kind`` holding every (ids, vectors) chunk; with ``check_recall``
    (approximate kinds), recall@10 of ``RECALL_QUERIES`` stored vectors against exact."""
    t0 = time.perf_counter()
    index = VectorIndex.new(kind, dim, cfg, train)
    exact = faiss.IndexFlatIP(dim) if check_recall and kind != "flat" else None
    all_ids = []
    for ids, vecs in chunks:
        index.add(vecs, ids)
        if exact is not None:
            exact.add(vecs)
            all_ids.append(ids)
    took = time.perf_counter() - t0
    log.info("index: rebuilt as %s with %d vectors in %.1f s", kind, index.ntotal, took)
    recall = None
    if exact is not None and exact.ntotal:
        recall = _recall(index._index, exact, np.concatenate(all_ids))
        log.info("index: recall@%d of %s vs exact = %.4f", RECALL_K, kind, recall)
    return Built(index, took, recall)


def _recall(index: Any, exact: Any, ids: np.ndarray) -> float:
    rng = np.random.default_rng(0)
    pick = rng.choice(exact.ntotal, size=min(RECALL_QUERIES, exact.ntotal), replace=False)
    queries = np.vstack([exact.reconstruct(int(i)) for i in pick])
    k = min(RECALL_K, exact.ntotal)
    _, truth = exact.search(queries, k)
    _, got = index.search(queries, k)
    hits = sum(len(set(ids[t[t >= 0]].tolist()) & set(g.tolist()))
               for t, g in zip(truth, got, strict=True))
    return round(hits / (k * len(queries)), 4)


def exact_search(q: np.ndarray, vecs: np.ndarray, ids: np.ndarray,
                 k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force top-``k`` inner products of ``q`` against ``vecs`` (labelled ``ids``)."""
    sims = q @ vecs.T
    k = min(k, len(ids))
    top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    part = np.take_along_axis(sims, top, axis=1)
    order = np.argsort(-part, axis=1)
    return np.take_along_axis(part, order, axis=1), ids[np.take_along_axis(top, order, axis=1)]


def make_index(kind: Kind, dim: int, cfg: RetrievalConfig,
               train: np.ndarray | None = None) -> Any:
    """An empty ``IndexIDMap2`` of ``kind`` (flat | hnsw | ivfpq), inner-product metric.

    IVF-PQ is trained on ``train``: ``nlist`` is capped at len(train)/39 (faiss' minimum
    points per centroid) and the PQ sub-quantiser count is the largest divisor of ``dim``
    not above ``pq_m``.
    """
    if kind == "flat":
        base: Any = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        base = faiss.IndexHNSWFlat(dim, cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        base.hnsw.efConstruction = cfg.hnsw_ef_construction
        base.hnsw.efSearch = cfg.hnsw_ef_search
    else:
        if train is None or len(train) == 0:
            raise ValueError("an IVF-PQ index needs training vectors")
        nlist = max(1, min(cfg.ivf_nlist, len(train) // 39))
        m = max(d for d in range(1, min(cfg.pq_m, dim) + 1) if dim % d == 0)
        quantizer = faiss.IndexFlatIP(dim)
        base = faiss.IndexIVFPQ(quantizer, dim, nlist, m, 8, faiss.METRIC_INNER_PRODUCT)
        base.own_fields = True
        quantizer.this.disown()
        base.train(train)
        base.nprobe = cfg.ivf_nprobe
    return faiss.IndexIDMap2(base)


def kind_of(index: Any) -> Kind:
    """The structure inside an ``IndexIDMap2`` (a checkpoint read back)."""
    inner = faiss.downcast_index(faiss.downcast_index(index).index)
    if isinstance(inner, faiss.IndexHNSW):
        return "hnsw"
    if isinstance(inner, faiss.IndexIVFPQ):
        return "ivfpq"
    return "flat"
