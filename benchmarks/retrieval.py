"""Retrieval index benchmark: memory, disk, query latency and recall@10 per index kind.

Everything goes through the appliance's own ``TileIndex`` (SQLite log with float16 vectors
+ faiss), so the numbers include what the appliance really pays: the durable SQLite write
per cell, checkpoints, rebuilds from the log, the re-ranking reads and the row join per
query.

Data: synthetic vectors with the statistics of *real* embeddings. The AID bundle's
embedder is run (onnxruntime) on the bundle's bank of 1,440 held-out backbone features
(30 classes); from its 158-d unit embeddings come the 30 class means and the pooled
within-class covariance Σ. The generator draws ``CLUSTERS`` sub-cluster centres (a class
mean + 0.8·N(0, Σ): places of one class differ as real images of a class do) and each
vector as a centre + 0.6·N(0, Σ), L2-normalised, so the spectrum, the class structure and
the same-class cosines follow the real model. Vectors are generated chunk by chunk from
fixed seeds and the exact top-10 of 1,000 fresh queries from the same generator is kept
while the chunks stream past (numpy/BLAS, float32), so no size needs them all in memory.
Metadata is realistic too: 5,000 cells per scene with a sha256 scene id, a file name, a
pixel window, UTM and WGS84 bounds, a class and a confidence, as the pipeline writes them.

Per size the index is filled once with ``index_type: auto`` (flat → HNSW → IVF-SQ as it
grows), then rebuilt from the log as each other kind. Each kind is then *measured in a
fresh process* that opens the state folder as the daemon would (checkpoint + log): its
peak resident memory (VmHWM: faiss, SQLite's page cache, Python, numpy and faiss
themselves), single-query latency through ``TileIndex.search`` (k=10, one faiss thread,
``LATENCY_QUERIES`` queries one at a time, p50/p99) and recall@10 of ``search_batch``
against the exact top-10, for each ``ivf_nprobe`` and ``rerank`` given: ``recall_at_10``
against exact search over the vectors as the log keeps them (float16, what a flat index
of this log returns) and ``recall_at_10_vs_float32`` against the float32 originals (which
adds what float16 storage moves among near-ties); then the faiss shortlist alone
(``faiss_only_p50_ms``), the part of a query that grows with the index (√n for IVF with
2·√n lists), from which the 10M figures are projected. Disk: the SQLite file (+ WAL)
and the faiss checkpoint. The machine is shared: its load average is recorded.

    .venv/bin/python benchmarks/retrieval.py [--sizes 200000 1000000] [--out FILE]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from appliance.config import RetrievalConfig
from appliance.contract.bundle import load_bundle
from appliance.retrieval.entry_log import Entry
from appliance.retrieval.index import DB_NAME, FAISS_NAME, TileIndex
from appliance.retrieval.vector_index import QUANTISED, SHORTLIST_MIN, VectorIndex

QUERIES = 1000
LATENCY_QUERIES = 300
K = 10
SCENE_CELLS = 5000  # cells per scene, added in one replace() call
CLUSTERS = 4000
BUNDLE = Path("/work/runs/aid_ft/bundle_renorm")
RESULTS = Path(__file__).parent / "results" / "retrieval.json"


class Generator:
    """Embeddings with the real model's statistics (see the module docstring)."""

    def __init__(self, bundle: Path, seed: int = 0) -> None:
        import onnxruntime as ort  # the benchmark, not the edge, runs the embedder here

        loaded = load_bundle(bundle)
        bank = np.load(bundle / "source_bank.npz")
        session = ort.InferenceSession(str(bundle / "embedder.onnx"),
                                       providers=["CPUExecutionProvider"])
        e = session.run(None, {session.get_inputs()[0].name:
                               bank["features"].astype(np.float32)})[0]
        e /= np.linalg.norm(e, axis=1, keepdims=True)
        labels = bank["labels"]
        classes = np.unique(labels)
        means = np.stack([e[labels == c].mean(0) for c in classes])
        within = np.concatenate([e[labels == c] - e[labels == c].mean(0) for c in classes])
        self.dim = e.shape[1]
        self.chol = np.linalg.cholesky(np.cov(within.T) + 1e-6 * np.eye(self.dim)).astype(
            np.float32)
        rng = np.random.default_rng(seed)
        self.cluster_class = rng.integers(0, len(classes), CLUSTERS)
        self.centres = (means[self.cluster_class] + 0.8 * self._noise(rng, CLUSTERS)).astype(
            np.float32)
        self.class_names = [loaded.manifest.class_names[int(c)] for c in classes]
        sims = e @ e.T
        same = labels[:, None] == labels[None]
        spectrum = np.linalg.eigvalsh(np.cov(e.T))[::-1]
        self.real = {"embeddings": len(e), "dim": self.dim, "classes": len(classes),
                     "same_class_cosine": round(float(sims[same].mean()), 3),
                     "other_class_cosine": round(float(sims[~same].mean()), 3),
                     "dims_for_90pct_variance": int(np.searchsorted(
                         np.cumsum(spectrum) / spectrum.sum(), 0.9)) + 1}

    def _noise(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return rng.standard_normal((n, self.dim), np.float32) @ self.chol.T

    def chunk(self, index: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Chunk ``index`` of the stream: [n, dim] unit vectors and their class indices."""
        rng = np.random.default_rng((1, index))
        which = rng.integers(0, CLUSTERS, n)
        x = self.centres[which] + 0.6 * self._noise(rng, n)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x.astype(np.float32), self.cluster_class[which]

    def queries(self, n: int) -> np.ndarray:
        return self.chunk(10**9, n)[0]  # a chunk the stream never reaches


def entries(scene: int, classes: np.ndarray, names: list[str]) -> list[Entry]:
    """Realistic metadata for one scene's cells: a 56-px grid of a 10 m UTM scene."""
    rng = np.random.default_rng((2, scene))
    sid = hashlib.sha256(f"scene-{scene}".encode()).hexdigest()
    source = f"S2B_MSIL2A_2026{scene % 12 + 1:02d}15_T31UFU_{scene:05d}.tif"
    x0, y0, lon0, lat0 = 500_000 + 10_000 * scene, 5_700_000, 3.0, 51.4
    out = []
    for i, c in enumerate(classes):
        col, row = i % 70 * 56, i // 70 * 56
        lon, lat = lon0 + col * 1.4e-4, lat0 - row * 9e-5
        out.append(Entry(
            scene_id=sid, source=source, window=(col, row, 56, 56), crs="EPSG:32631",
            transform=(10.0, 0.0, float(x0), 0.0, -10.0, float(y0)),
            bounds_wgs84=(lon, lat - 5.04e-3, lon + 7.84e-3, lat),
            class_name=names[int(c)], confidence=float(rng.uniform(0.3, 1.0))))
    return out


def merge_top(best: tuple[np.ndarray, np.ndarray], queries: np.ndarray, vecs: np.ndarray,
              ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The exact top-K so far, updated with one chunk."""
    sims = queries @ vecs.T
    top = np.argpartition(-sims, K - 1, axis=1)[:, :K]
    s = np.concatenate([best[0], np.take_along_axis(sims, top, 1)], axis=1)
    i = np.concatenate([best[1], ids[top]], axis=1)
    keep = np.argsort(-s, axis=1)[:, :K]
    return np.take_along_axis(s, keep, 1), np.take_along_axis(i, keep, 1)


def disk(state: Path) -> dict[str, Any]:
    """Bytes on disk: SQLite (+ WAL), the faiss checkpoint, and SQLite's tables and indexes
    one by one (its ``dbstat`` table), the vectors apart from the metadata."""
    sizes = {p.name: p.stat().st_size for p in state.iterdir() if p.is_file()}
    sqlite = sum(v for k, v in sizes.items() if k.startswith(DB_NAME))
    with sqlite3.connect(f"file:{state / DB_NAME}?mode=ro", uri=True) as db:
        parts = dict(db.execute("SELECT name, SUM(pgsize) FROM dbstat GROUP BY name"))
    return {"sqlite_bytes": sqlite, "faiss_bytes": sizes.get(FAISS_NAME, 0),
            "total_bytes": sqlite + sizes.get(FAISS_NAME, 0), "sqlite_parts": parts}


def probe(state: Path, cfg: dict[str, Any], dim: int, nprobes: list[int],
          reranks: list[int]) -> dict[str, Any]:
    """In this (fresh) process: open the index as the daemon would and measure it."""
    import faiss

    queries = np.load(state.parent / "queries.npy")
    truth = np.load(state.parent / "truth.npy")
    truth16 = np.load(state.parent / "truth16.npy")
    t0 = time.perf_counter()
    index = TileIndex(state, RetrievalConfig.model_validate(cfg), dim, read_only=True)
    out: dict[str, Any] = {"open_s": round(time.perf_counter() - t0, 2), "type": index.kind,
                           "n": index.count()}
    faiss.omp_set_num_threads(1)
    rows = []
    quantised = index.kind in QUANTISED
    for nprobe, rerank in [(p, r) for p in nprobes for r in reranks] if quantised else [
            (None, None)]:
        if nprobe is not None and rerank is not None:
            index.cfg.ivf_nprobe, index.cfg.rerank = nprobe, rerank
        index.search(queries[0], K)  # warm the code path
        times = []
        for q in queries[:LATENCY_QUERIES]:
            t = time.perf_counter()
            index.search(q, K)
            times.append((time.perf_counter() - t) * 1000)
        hits = index.search_batch(queries, K)
        rows.append({"nprobe": nprobe, "rerank": rerank,
                     "p50_ms": round(float(np.percentile(times, 50)), 3),
                     "p99_ms": round(float(np.percentile(times, 99)), 3),
                     "recall_at_10": recall(hits, truth16),
                     "recall_at_10_vs_float32": recall(hits, truth)})
    out["queries"] = rows
    status = Path("/proc/self/status").read_text()
    out["peak_rss_bytes"] = next(int(line.split()[1]) * 1024 for line in status.splitlines()
                                 if line.startswith("VmHWM"))
    index.close()
    # faiss alone (the shortlist: no re-ranking, no row join), the part that grows with n.
    alone = VectorIndex.read(state / FAISS_NAME, dim, index.cfg)
    assert alone is not None
    for row in rows:
        shortlist = K
        if row["nprobe"] is not None:
            alone.cfg.ivf_nprobe = row["nprobe"]
            shortlist = max(K * row["rerank"], SHORTLIST_MIN)
        times = []
        for q in queries[:LATENCY_QUERIES]:
            t = time.perf_counter()
            alone.search(q[None], shortlist)
            times.append((time.perf_counter() - t) * 1000)
        row["faiss_only_p50_ms"] = round(float(np.percentile(times, 50)), 3)
    return out


def recall(hits: list[list[Any]], truth: np.ndarray) -> float:
    return round(float(np.mean([len({h.id for h in got} & set(t.tolist())) / K
                                for got, t in zip(hits, truth, strict=True)])), 4)


def measure(state: Path, cfg: dict[str, Any], dim: int, nprobes: list[int],
            reranks: list[int]) -> dict[str, Any]:
    """``probe`` in a child process, so its memory is the index's, not this script's data."""
    cmd = [sys.executable, __file__, "probe", "--state", str(state), "--cfg", json.dumps(cfg),
           "--dim", str(dim), "--nprobe", *map(str, nprobes), "--rerank", *map(str, reranks)]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def run_size(n: int, gen: Generator, work: Path, kinds: list[dict[str, Any]],
             nprobes: list[int], reranks: list[int], threads: int) -> dict[str, Any]:
    state = work / f"n{n}" / "state"
    shutil.rmtree(state.parent, ignore_errors=True)
    state.mkdir(parents=True)
    queries = gen.queries(QUERIES)
    best = (np.full((QUERIES, K), -np.inf, np.float32), np.full((QUERIES, K), -1, np.int64))
    best16 = best  # exact over the vectors as the log stores them (float16)
    auto = {"index_type": "auto", "faiss_threads": threads}
    index = TileIndex(state, RetrievalConfig.model_validate(auto), gen.dim)
    t0 = time.perf_counter()
    next_id = 1  # a fresh log: ids are 1..n in insertion order
    for scene, start in enumerate(range(0, n, SCENE_CELLS)):
        vecs, classes = gen.chunk(scene, min(SCENE_CELLS, n - start))
        rows = entries(scene, classes, gen.class_names)
        index.replace([rows[0].scene_id], rows, vecs)
        ids = np.arange(next_id, next_id + len(vecs))
        best = merge_top(best, queries, vecs, ids)
        best16 = merge_top(best16, queries, vecs.astype(np.float16).astype(np.float32), ids)
        next_id += len(vecs)
    index.close()
    fill_s = time.perf_counter() - t0
    np.save(state.parent / "queries.npy", queries)
    np.save(state.parent / "truth.npy", best[1])
    np.save(state.parent / "truth16.npy", best16[1])
    out: dict[str, Any] = {"n": n, "dim": gen.dim, "fill": {
        "seconds": round(fill_s, 1), "cells_per_s": round(n / fill_s, 1),
        "recall_check": TileIndex(state, RetrievalConfig.model_validate(auto), gen.dim,
                                  read_only=True).stats()["recall_check"]}}
    results = []
    for kind in [{}, *kinds]:  # {}: the default (auto) as filled
        cfg = {**auto, **kind}
        t0 = time.perf_counter()
        if kind:  # rebuilt from the log in this kind, checkpoint written
            TileIndex(state, RetrievalConfig.model_validate(cfg), gen.dim).close()
        default = {"index_type": "auto (default)",
                   "sq_bits": RetrievalConfig.model_validate(auto).sq_bits}
        row: dict[str, Any] = {"config": kind or default,
                               "rebuild_s": round(time.perf_counter() - t0, 1) if kind else None,
                               **disk(state)}
        row.update(measure(state, cfg, gen.dim, nprobes, reranks))
        results.append(row)
        logging.info("n=%d %s", n, json.dumps(row))
    out["kinds"] = results
    shutil.rmtree(state.parent, ignore_errors=True)
    return out


def project(sizes: list[dict[str, Any]], n: int) -> dict[str, Any]:
    """Figures at ``n`` vectors per kind (and code size), from the two largest sizes
    measured of it: memory and disk grow by the measured bytes per vector between them;
    single-query p50 by the faiss shortlist's share growing as √n (IVF with 2·√n lists
    scans √n/2 codes per list probed; re-ranking and the row join stay flat)."""
    out: dict[str, Any] = {"n": n}
    kinds: dict[str, list[tuple[int, dict[str, Any]]]] = {}
    for size in sizes:
        for row in size["kinds"]:
            # the kind built (``type``) and its settings: the default row pairs with the
            # explicit row of the same kind and code size measured at another size
            key = {"type": row["type"],
                   **{k: v for k, v in row["config"].items() if k != "index_type"}}
            kinds.setdefault(json.dumps(key, sort_keys=True), []).append((size["n"], row))
    for name, rows in kinds.items():
        rows.sort(key=lambda r: r[0])
        if len(rows) < 2:
            continue
        (n1, a), (n2, b) = rows[-2], rows[-1]

        def grow(key: str, a: dict[str, Any] = a, b: dict[str, Any] = b,
                 n1: int = n1, n2: int = n2) -> float:
            per = (b[key] - a[key]) / (n2 - n1)
            return float(b[key] + per * (n - n2))

        queries = [{"nprobe": q["nprobe"], "rerank": q["rerank"],
                    "p50_ms": round(q["p50_ms"] + q["faiss_only_p50_ms"]
                                    * (np.sqrt(n / n2) - 1), 2),
                    "recall_at_10_measured_at_largest": q["recall_at_10"]}
                   for q in b["queries"] if q["nprobe"] is not None]
        out[name] = {
            "from_sizes": [n1, n2],
            "bytes_per_vector": {k: round((b[k] - a[k]) / (n2 - n1), 1) for k in (
                "peak_rss_bytes", "faiss_bytes", "sqlite_bytes")},
            "memory_gb": round(grow("peak_rss_bytes") / 1e9, 2),
            "faiss_gb": round(grow("faiss_bytes") / 1e9, 2),
            "disk_gb": round(grow("total_bytes") / 1e9, 2),
            "sqlite_gb": round(grow("sqlite_bytes") / 1e9, 2),
            "queries": queries}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", nargs="?", default="run", choices=["run", "probe", "project"],
                        help="run: measure --sizes (appended to --out with --append); "
                        "project: add the 10M projection to --out")
    parser.add_argument("--sizes", type=int, nargs="+", default=[200_000, 1_000_000])
    parser.add_argument("--nprobe", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--rerank", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--kinds", default=json.dumps([{"index_type": "ivfsq"},
        {"index_type": "ivfsq", "sq_bits": 4}, {"index_type": "ivfpq", "ivf_nlist": None},
        {"index_type": "flat"}]), help="JSON list of retrieval settings to rebuild as")
    parser.add_argument("--bundle", type=Path, default=BUNDLE)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--build-threads", type=int, default=2, help="faiss threads to build")
    parser.add_argument("--work", type=Path, default=None, help="Scratch folder (big).")
    parser.add_argument("--append", action="store_true", help="Add to the sizes in --out.")
    parser.add_argument("--state", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--cfg", help=argparse.SUPPRESS)
    parser.add_argument("--dim", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    if args.mode == "probe":
        print(json.dumps(probe(args.state, json.loads(args.cfg), args.dim, args.nprobe,
                                args.rerank)))
        return
    if args.mode == "project":
        done = json.loads(args.out.read_text())
        done["projection_10M"] = project(done["sizes"], 10_000_000)
        args.out.write_text(json.dumps(done, indent=2) + "\n")
        print(json.dumps(done["projection_10M"], indent=2))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if not (args.bundle / "embedder.onnx").is_file():
        raise SystemExit(f"no bundle at {args.bundle}: its embedder gives the real statistics")
    gen = Generator(args.bundle)
    work = args.work or Path(tempfile.mkdtemp(prefix="tt-bench-"))
    result: dict[str, Any] = {
        "benchmark": "retrieval", "k": K, "queries": QUERIES,
        "latency_queries": LATENCY_QUERIES,
        "data": f"synthetic with real embedding statistics ({args.bundle.name} embedder on its "
                f"source bank), {CLUSTERS} sub-clusters, {SCENE_CELLS} cells per scene",
        "real_embedding_statistics": gen.real,
        "machine": {"cpu": platform.processor() or platform.machine(),
                    "cores": os.cpu_count()},
        "sizes": [],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.append and args.out.is_file():
        result["sizes"] = json.loads(args.out.read_text())["sizes"]
    for n in args.sizes:
        size = run_size(n, gen, work, json.loads(args.kinds), args.nprobe, args.rerank,
                        args.build_threads)
        size["load_average"] = os.getloadavg()
        result["sizes"].append(size)
        args.out.write_text(json.dumps(result, indent=2) + "\n")  # partial results survive
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
