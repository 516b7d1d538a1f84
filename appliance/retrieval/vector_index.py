"""The faiss half of the retrieval index: which structure, how it is built, searched and saved.

Embeddings are L2-normalised, so inner product is cosine. The structure follows the size of
the log and ``retrieval.index_type`` (``desired_kind``). With ``auto``: exact
``IndexFlatIP`` up to ``exact_max`` vectors, HNSW up to ``hnsw_max``, then IVF over
scalar-quantised codes (``ivfsq``: ``sq_bits`` per dimension, 8 by default, a byte).
``hnsw``, ``ivfpq`` or ``ivfsq`` fix the kind above ``exact_max``. A larger kind
stays until the log shrinks to half the threshold below it, so a size near a threshold does
not make the index flip back and forth. Flat, HNSW and IVF-PQ sit in an ``IndexIDMap2``
keyed by the entry log's ids (``retrieval.entry_log``); IVF-SQ keeps the ids in its own
inverted lists (an id map would cost a third of its codes again).

The quantised kinds (``ivfpq``, ``ivfsq``) only *shortlist*: ``search`` asks faiss for
``rerank`` × k candidates (40 at least) and re-scores them exactly from the stored vectors
(``exact``: the entry log's float16 vectors, read per query), so recall is set by the
inverted lists probed (``ivf_nprobe``), not by the coarse codes. IVF-SQ pads vectors with
zeros to a multiple of 16 dimensions (inner products are unchanged) because faiss' SIMD code
for scalar quantisers needs it: 158-d codes are scanned five times slower than 160-d ones.
With ``ivf_nlist`` unset the lists follow the size, 2·√n; an index whose size outgrew its
lists fourfold, or whose ``sq_bits`` changed (``stale``), is rebuilt by its owner, so
rebuild work stays linear.

``build`` makes a new index from every vector of the log and, when asked, measures its
recall@10 (re-ranked as searches are) against exact search for a sample of the stored
vectors; the exact answer is computed while the chunks stream past, so no second copy of
the vectors is held.

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
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import faiss as _faiss
import numpy as np

from appliance.config import RetrievalConfig
from appliance.contract.durable import atomic_path

log = logging.getLogger(__name__)

Kind = Literal["flat", "hnsw", "ivfpq", "ivfsq"]
QUANTISED: frozenset[Kind] = frozenset({"ivfpq", "ivfsq"})
SIMD_WIDTH = 16  # IVF-SQ dimensions are padded to a multiple of this
SHORTLIST_MIN = 40  # re-ranked candidates at least, so a top-1 query is not left to the codes
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
    """The structure for ``n`` vectors when the index is now ``current`` (see the module)."""
    if cfg.index_type == "flat":
        return "flat"
    tiers: list[tuple[Kind, int | None]] = (
        [("flat", cfg.exact_max), ("hnsw", cfg.hnsw_max), ("ivfsq", None)]
        if cfg.index_type == "auto" else [("flat", cfg.exact_max), (cfg.index_type, None)])
    kinds = [k for k, _ in tiers]
    by_size = next(i for i, (_, top) in enumerate(tiers) if top is None or n <= top)
    if current in kinds:
        now = kinds.index(current)
        below = tiers[now - 1][1] if now > 0 else None
        if now > by_size and below is not None and n > below // 2:
            return current  # hysteresis: a larger kind stays down to half the threshold
    return kinds[by_size]


def nlist_for(cfg: RetrievalConfig, n: int) -> int:
    """Inverted lists for an IVF index of ``n`` vectors: ``ivf_nlist``, or 2·√n unset."""
    return cfg.ivf_nlist if cfg.ivf_nlist is not None else max(1, round(2 * np.sqrt(n)))


def train_size(cfg: RetrievalConfig, n: int) -> int:
    """Training vectors to draw for an IVF index of ``n`` (64 per list, 256 at least)."""
    return max(256, 64 * nlist_for(cfg, n))


def ivf_lists(cfg: RetrievalConfig, n: int) -> int:
    """The lists an IVF index of ``n`` vectors gets: ``nlist_for`` it, capped by faiss'
    minimum of 39 training points per list."""
    return max(1, min(nlist_for(cfg, n), min(n, train_size(cfg, n)) // 39))


def faiss_dim(kind: Kind, dim: int) -> int:
    """The dimension faiss holds for ``dim``-d embeddings: IVF-SQ pads (see the module)."""
    return -(-dim // SIMD_WIDTH) * SIMD_WIDTH if kind == "ivfsq" else dim


class VectorIndex:
    """One faiss index of entry ids and vectors, with its tombstones (see the module)."""

    def __init__(self, index: Any, cfg: RetrievalConfig) -> None:
        self._index = index
        self.cfg = cfg  # read at each search: a changed efSearch/nprobe applies at once
        self.kind = kind_of(index)
        self.tombstones: set[int] = set()

    @classmethod
    def new(cls, kind: Kind, dim: int, cfg: RetrievalConfig, train: np.ndarray | None = None,
            size: int | None = None) -> VectorIndex:
        """An empty index of ``kind`` for ``size`` vectors (the IVF kinds are trained on
        ``train``)."""
        return cls(make_index(kind, dim, cfg, train, size), cfg)

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
        return cls(index, cfg) if index.d == faiss_dim(kind_of(index), dim) else None

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
    def nlist(self) -> int:
        """Inverted lists of an IVF kind (0 for the others)."""
        return int(self._ivf().nlist) if self.kind in QUANTISED else 0

    def stale(self, n: int) -> bool:
        """True when an IVF index no longer fits the settings or ``n``: other ``sq_bits``,
        or (``ivf_nlist`` unset) built now it would have at least twice its lists, i.e.
        ``n`` grew fourfold since it was trained (twofold while the training set caps the
        lists). Its owner rebuilds it."""
        if self.kind not in QUANTISED:
            return False
        if self.kind == "ivfsq" and self._ivf().sq.qtype != _SQ_TYPES[self.cfg.sq_bits]:
            return True
        return self.cfg.ivf_nlist is None and ivf_lists(self.cfg, n) >= 2 * self.nlist

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
        self._index.add_with_ids(self._pad(vectors), ids)

    def remove(self, ids: np.ndarray) -> None:
        if not len(ids):
            return
        if self.kind == "hnsw":
            self.tombstones.update(int(i) for i in ids)
        else:
            self._index.remove_ids(faiss.IDSelectorBatch(np.ascontiguousarray(ids, np.int64)))

    def search(self, q: np.ndarray, k: int, allowed: np.ndarray | None = None,
               exact: Callable[[np.ndarray], np.ndarray] | None = None,
               ) -> tuple[np.ndarray, np.ndarray]:
        """[n,k] scores and ids (-1: none) among ``allowed`` ids, or all but tombstones.

        A quantised kind given ``exact`` (ids -> their stored vectors) shortlists
        ``rerank`` × k candidates (``SHORTLIST_MIN`` at least) and returns them re-scored
        exactly (see the module)."""
        if exact is not None and self.kind in QUANTISED:
            _, ids = self._search(q, max(k * self.cfg.rerank, SHORTLIST_MIN), allowed)
            return rerank(q, ids, exact, k)
        return self._search(q, k, allowed)

    def _search(self, q: np.ndarray, k: int,
                allowed: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
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
        elif self.kind in QUANTISED:
            params = faiss.SearchParametersIVF(nprobe=self.cfg.ivf_nprobe, sel=sel)
        else:
            params = faiss.SearchParameters(sel=sel)
        scores, ids = self._index.search(self._pad(q), k, params=params)
        return scores, ids

    def _pad(self, x: np.ndarray) -> np.ndarray:
        """``x`` with the zero columns faiss' dimension adds (none for most kinds)."""
        return _padded(x, int(self._index.d))

    def _ivf(self) -> Any:
        """The IVF index itself (inside the id map, if there is one)."""
        index = faiss.downcast_index(self._index)
        return faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index

    def _stored_ids(self) -> np.ndarray:
        if self.kind != "ivfsq":
            return faiss.vector_to_array(self._index.id_map).astype(np.int64)
        lists = self._ivf().invlists
        parts = [faiss.rev_swig_ptr(lists.get_ids(i), lists.list_size(i)).copy()
                 for i in range(lists.nlist) if lists.list_size(i)]
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


def _padded(x: np.ndarray, d: int) -> np.ndarray:
    """``x`` as a contiguous float32 [n, d] array, zero columns added on the right."""
    if x.shape[1] == d:
        return np.ascontiguousarray(x, np.float32)
    out = np.zeros((len(x), d), np.float32)
    out[:, :x.shape[1]] = x
    return out


def rerank(q: np.ndarray, candidates: np.ndarray, exact: Callable[[np.ndarray], np.ndarray],
           k: int) -> tuple[np.ndarray, np.ndarray]:
    """The top ``k`` of each query's ``candidates`` ([n,m] ids, -1: none) by exact inner
    product with their vectors from ``exact``; [n,k] scores and ids, padded with -1."""
    scores = np.full((len(q), k), -np.inf, np.float32)
    ids = np.full((len(q), k), -1, np.int64)
    for qi, row in enumerate(candidates):
        row = row[row >= 0]
        if not len(row):
            continue
        sims = exact(row) @ q[qi]
        top = np.argsort(-sims, kind="stable")[:k]
        scores[qi, :len(top)], ids[qi, :len(top)] = sims[top], row[top]
    return scores, ids


@dataclass(frozen=True)
class Built:
    """A rebuilt index, how long adding took, and its recall@10 if it was measured."""

    index: VectorIndex
    seconds: float
    recall: float | None


@dataclass(frozen=True)
class RecallProbe:
    """What a recall check needs: query vectors drawn from the log (up to
    ``RECALL_QUERIES``) and the stored vectors by id, for re-ranking as searches do."""

    queries: np.ndarray
    exact: Callable[[np.ndarray], np.ndarray]


def build(kind: Kind, dim: int, cfg: RetrievalConfig,
          chunks: Iterable[tuple[np.ndarray, np.ndarray]], train: np.ndarray | None = None,
          probe: RecallProbe | None = None, size: int | None = None) -> Built:
    """A new index of ``kind`` holding every (ids, vectors) chunk (``size`` of them, if
    known: it sizes IVF lists); with a ``probe`` (approximate kinds), recall@10 of its
    queries against exact search."""
    t0 = time.perf_counter()
    index = VectorIndex.new(kind, dim, cfg, train, size)
    check = probe is not None and kind != "flat" and len(probe.queries) > 0
    queries = probe.queries if probe is not None and check else np.zeros((0, dim), np.float32)
    truth_s = np.full((len(queries), RECALL_K), -np.inf, np.float32)
    truth_i = np.full((len(queries), RECALL_K), -1, np.int64)
    for ids, vecs in chunks:
        index.add(vecs, ids)
        if check:  # exact top-k so far, merged chunk by chunk
            s, i = exact_search(queries, vecs, ids, RECALL_K)
            s, i = np.concatenate([truth_s, s], 1), np.concatenate([truth_i, i], 1)
            keep = np.argsort(-s, axis=1, kind="stable")[:, :RECALL_K]
            truth_s, truth_i = np.take_along_axis(s, keep, 1), np.take_along_axis(i, keep, 1)
    took = time.perf_counter() - t0
    log.info("index: rebuilt as %s with %d vectors in %.1f s", kind, index.ntotal, took)
    recall = None
    if check and probe is not None and index.ntotal:
        k = min(RECALL_K, index.ntotal)
        _, got = index.search(queries, k, exact=probe.exact)
        hits = sum(len(set(t[:k][t[:k] >= 0].tolist()) & set(g.tolist()))
                   for t, g in zip(truth_i, got, strict=True))
        recall = round(hits / (k * len(queries)), 4)
        log.info("index: recall@%d of %s vs exact = %.4f", RECALL_K, kind, recall)
    return Built(index, took, recall)


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
               train: np.ndarray | None = None, size: int | None = None) -> Any:
    """An empty index of ``kind`` (flat | hnsw | ivfpq | ivfsq), inner-product metric: an
    ``IndexIDMap2`` around it, except IVF-SQ, which holds ids itself.

    The IVF kinds are trained on ``train``: ``nlist`` (``nlist_for`` ``size``, the vectors
    it is built for, by default the training set's) is capped at len(train)/39, faiss'
    minimum points per centroid. The PQ sub-quantiser count is the largest divisor of
    ``dim`` not above ``pq_m``; IVF-SQ codes have ``sq_bits`` per (padded) dimension.
    """
    if kind == "flat":
        return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    if kind == "hnsw":
        base = faiss.IndexHNSWFlat(dim, cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        base.hnsw.efConstruction = cfg.hnsw_ef_construction
        base.hnsw.efSearch = cfg.hnsw_ef_search
        return faiss.IndexIDMap2(base)
    if train is None or len(train) == 0:
        raise ValueError(f"an {kind} index needs training vectors")
    nlist = max(1, min(nlist_for(cfg, size or len(train)), len(train) // 39))
    d = faiss_dim(kind, dim)
    quantizer = faiss.IndexFlatIP(d)
    if kind == "ivfpq":
        m = max(f for f in range(1, min(cfg.pq_m, d) + 1) if d % f == 0)
        base = faiss.IndexIVFPQ(quantizer, d, nlist, m, 8, faiss.METRIC_INNER_PRODUCT)
    else:
        base = faiss.IndexIVFScalarQuantizer(quantizer, d, nlist, _SQ_TYPES[cfg.sq_bits],
                                             faiss.METRIC_INNER_PRODUCT)
    base.own_fields = True
    quantizer.this.disown()
    base.train(_padded(train, d))
    base.nprobe = cfg.ivf_nprobe
    return faiss.IndexIDMap2(base) if kind == "ivfpq" else base


def kind_of(index: Any) -> Kind:
    """The structure of an index (inside its ``IndexIDMap2``, if any): a checkpoint read back."""
    inner = faiss.downcast_index(index)
    if isinstance(inner, faiss.IndexIDMap):
        inner = faiss.downcast_index(inner.index)
    if isinstance(inner, faiss.IndexHNSW):
        return "hnsw"
    if isinstance(inner, faiss.IndexIVFPQ):
        return "ivfpq"
    if isinstance(inner, faiss.IndexIVFScalarQuantizer):
        return "ivfsq"
    return "flat"


_SQ_TYPES = {4: faiss.ScalarQuantizer.QT_4bit, 6: faiss.ScalarQuantizer.QT_6bit,
             8: faiss.ScalarQuantizer.QT_8bit}
