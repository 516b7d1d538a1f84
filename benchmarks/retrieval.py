"""Retrieval index benchmark: add throughput, query latency, recall@10, size on disk.

Everything goes through the appliance's own ``TileIndex`` (SQLite log + faiss), so the
numbers include what the appliance really pays: the durable SQLite write per vector,
checkpoints, the row join per query. Data: *clustered* synthetic 128-d vectors (1000
Gaussian clusters with random spreads, L2-normalised), more realistic than uniform noise
because real embeddings are clustered by class; queries are 1000 fresh draws from the same
clusters (not in the index). Ground truth: exact inner-product search (numpy/BLAS).

For each size the index is filled once (``index_type: auto`` → HNSW beyond ``exact_max``),
then reopened as IVF-PQ and as flat, which exercises the rebuild-from-log path and its
recall check. Latency: single queries through ``TileIndex.search`` (k=10) one at a time;
recall@10: batched through ``TileIndex.search_batch``. Builds use ``--build-threads`` faiss
threads, queries one (the appliance default, ``retrieval.faiss_threads``). The machine
is shared: the load average at the end is recorded with the results.

    .venv/bin/python benchmarks/retrieval.py [--sizes 10000 100000 1000000] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from appliance.config import RetrievalConfig
from appliance.retrieval.entry_log import Entry
from appliance.retrieval.index import TileIndex

DIM = 128
QUERIES = 1000
LATENCY_QUERIES = 300
K = 10
BATCH = 5000  # vectors per "scene" added in one replace() call
RESULTS = Path(__file__).parent / "results" / "retrieval.json"


def clustered(n: int, rng: np.random.Generator, centres: np.ndarray) -> np.ndarray:
    """``n`` normalised points around random centres with per-cluster spread."""
    which = rng.integers(0, len(centres), n)
    spread = 0.03 + 0.04 * (np.arange(len(centres)) % 7) / 6  # same-cluster cosine ~0.6-0.9
    x = centres[which] + rng.normal(size=(n, DIM)).astype(np.float32) * spread[which, None]
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32)


def truth(data: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Exact top-K row numbers per query, by blocks to bound memory."""
    best_s = np.full((len(queries), K), -np.inf, np.float32)
    best_i = np.zeros((len(queries), K), np.int64)
    for start in range(0, len(data), 200_000):
        sims = queries @ data[start:start + 200_000].T
        top = np.argpartition(-sims, K - 1, axis=1)[:, :K]
        s = np.concatenate([best_s, np.take_along_axis(sims, top, 1)], axis=1)
        i = np.concatenate([best_i, top + start], axis=1)
        keep = np.argsort(-s, axis=1)[:, :K]
        best_s, best_i = np.take_along_axis(s, keep, 1), np.take_along_axis(i, keep, 1)
    return best_i


def measure(index: TileIndex, queries: np.ndarray, gt_ids: np.ndarray) -> dict[str, Any]:
    """p50/p99 single-query latency and batch recall@K against exact ids."""
    times = []
    for q in queries[:LATENCY_QUERIES]:
        t0 = time.perf_counter()
        index.search(q, K)
        times.append((time.perf_counter() - t0) * 1000)
    t0 = time.perf_counter()
    hits = index.search_batch(queries, K)
    batch_s = time.perf_counter() - t0
    found = sum(len({h.id for h in row} & set(g.tolist())) for row, g in zip(hits, gt_ids,
                                                                                strict=True))
    return {"p50_ms": round(float(np.percentile(times, 50)), 3),
            "p99_ms": round(float(np.percentile(times, 99)), 3),
            f"recall_at_{K}": round(found / gt_ids.size, 4),
            "batch_qps": round(len(queries) / batch_s, 1)}


def faiss_bytes(state: Path) -> int:
    return (state / "index.faiss").stat().st_size


def run_size(n: int, rng: np.random.Generator, centres: np.ndarray, work: Path,
             ef_values: list[int], nprobe_values: list[int],
             build_threads: int) -> dict[str, Any]:
    data = clustered(n, rng, centres)
    queries = clustered(QUERIES, rng, centres)
    gt = truth(data, queries) + 1  # fresh database: row ids are 1..n in insertion order
    state = work / f"n{n}"
    shutil.rmtree(state, ignore_errors=True)
    out: dict[str, Any] = {"n": n, "dim": DIM}

    cfg = RetrievalConfig(exact_max=5000, index_type="auto", checkpoint_every=BATCH,
                          faiss_threads=build_threads)
    index = TileIndex(state, cfg, DIM)
    t0 = time.perf_counter()
    for start in range(0, n, BATCH):
        part = data[start:start + BATCH]
        entries = [Entry(scene_id=f"bench-{start}", source="synthetic", class_name="c")] * len(part)
        index.replace([f"bench-{start}"], entries, part)
    index.checkpoint()
    add_s = time.perf_counter() - t0
    faiss.omp_set_num_threads(1)  # the appliance default: single queries on one thread
    stats = index.stats()
    out["add"] = {"seconds": round(add_s, 1), "vectors_per_s": round(n / add_s, 1),
                  "type": stats["type"], "recall_check": stats["recall_check"]}
    out["sqlite_bytes"] = sum(v for k, v in stats["files"].items() if "sqlite" in k)
    rows = []
    for ef in ef_values:
        index.cfg.hnsw_ef_search = ef
        rows.append({"type": "hnsw", "M": cfg.hnsw_m, "efConstruction": cfg.hnsw_ef_construction,
                     "efSearch": ef, **measure(index, queries, gt),
                     "faiss_bytes": faiss_bytes(state)})
        logging.info("n=%d %s", n, rows[-1])
    index.close()

    ivf_cfg = RetrievalConfig(exact_max=5000, index_type="ivfpq", pq_m=16,
                              ivf_nlist=int(min(4096, 4 * np.sqrt(n))),
                              faiss_threads=build_threads)
    t0 = time.perf_counter()
    index = TileIndex(state, ivf_cfg, DIM)  # checkpoint is HNSW: rebuilt from the log
    rebuild_s = time.perf_counter() - t0
    faiss.omp_set_num_threads(1)
    for nprobe in nprobe_values:
        index.cfg.ivf_nprobe = nprobe
        rows.append({"type": "ivfpq", "nlist": ivf_cfg.ivf_nlist, "pq_m": ivf_cfg.pq_m,
                     "nprobe": nprobe, "rebuild_s": round(rebuild_s, 1),
                     **measure(index, queries, gt), "faiss_bytes": faiss_bytes(state)})
        logging.info("n=%d %s", n, rows[-1])
    index.close()

    flat_cfg = RetrievalConfig(index_type="flat")
    index = TileIndex(state, flat_cfg, DIM)
    rows.append({"type": "flat", **measure(index, queries[:200], gt[:200]),
                 "faiss_bytes": faiss_bytes(state)})
    logging.info("n=%d %s", n, rows[-1])
    index.close()
    out["configs"] = rows
    shutil.rmtree(state, ignore_errors=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--ef", type=int, nargs="+", default=[16, 32, 64, 128])
    parser.add_argument("--nprobe", type=int, nargs="+", default=[8, 32, 64])
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--build-threads", type=int, default=2, help="faiss threads to build")
    parser.add_argument("--work", type=Path, default=None, help="Scratch folder (big).")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(1000, DIM)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="tt-bench-"))
    result: dict[str, Any] = {
        "benchmark": "retrieval", "data": "clustered synthetic, 1000 Gaussian clusters, "
        f"{DIM}-d, L2-normalised; {QUERIES} held-out queries", "k": K,
        "machine": {"cpu": platform.processor() or platform.machine(),
                    "threads": faiss.omp_get_max_threads()},
        "faiss": faiss.__version__, "sizes": [],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for n in args.sizes:
        result["sizes"].append(run_size(n, rng, centres, work, args.ef, args.nprobe,
                                        args.build_threads))
        result["load_average"] = os.getloadavg()
        args.out.write_text(json.dumps(result, indent=2))  # partial results survive a kill
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
