"""Retrieval quality on real data, measured by the appliance's own index code.

The held-out AID images (the ``val`` part of the exporter's ``split.json``, never seen in
training) are linked into a folder per class and indexed with the real CLI,
``terratile index add`` (backbone + embedder through onnxruntime, entries in the SQLite
log and faiss). Every indexed image is then a query with k=20, with its vector as stored in
the entry log, against all others (itself excluded) through ``TileIndex.search_batch``;
relevance = same class (the folder label). mAP@20 and P@20 come from
``appliance.contract.retrieval_metrics``, the same definitions the exporter reports. One
CLI ``terratile query --image`` per class checks the shell path.

    .venv/bin/python benchmarks/retrieval_aid.py --bundle /work/runs/aid_ft/bundle \\
        --split /work/runs/aid_ft/split.json --name fine-tuned
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from appliance.config import load_settings
from appliance.contract.bundle import load_bundle
from appliance.contract.retrieval_metrics import map_at_k, precision_at_k
from appliance.retrieval.entry_log import REFERENCE_PREFIX, EntryLog
from appliance.retrieval.index import DB_NAME, TileIndex

K = 20
RESULTS = Path(__file__).parent / "results" / "retrieval_aid.json"


def link_split(split: Path, out: Path) -> int:
    """``out/<class>/<file>`` symlinks to the val images; returns how many."""
    data = json.loads(split.read_text())
    for item in data["val"]:
        src = Path(item["path"])
        (out / item["labels"][0]).mkdir(parents=True, exist_ok=True)
        (out / item["labels"][0] / src.name).symlink_to(src)
    return len(data["val"])


def cli(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "appliance", *args], capture_output=True,
                          text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"terratile {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout


def references(db: Path, dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ids, vectors and labels of the reference images in the entry log, in id order."""
    entry_log = EntryLog(db, dim)
    try:
        chunks = list(entry_log.iter_vectors())
        ids = np.concatenate([i for i, _ in chunks])
        vectors = np.concatenate([v for _, v in chunks])
        entries = entry_log.entries(ids.tolist())
    finally:
        entry_log.close()
    refs = np.asarray([entries[int(i)][0].scene_id.startswith(REFERENCE_PREFIX) for i in ids])
    labels = np.asarray([entries[int(i)][0].label for i in ids[refs]])
    return ids[refs], vectors[refs], labels


def evaluate(bundle: Path, split: Path, work: Path) -> dict[str, Any]:
    refs = work / "aid_val"
    n_images = link_split(split, refs)
    config = work / "appliance.yaml"
    config.write_text(yaml.safe_dump({
        "paths": {"inbox": str(work / "inbox"), "results": str(work / "results"),
                  "failed": str(work / "failed"), "state": str(work / "state")},
        "model": {"bundle": str(bundle), "providers": ["cpu"]},
        "retrieval": {"allowed_dirs": [str(refs)]},
    }))
    t0 = time.perf_counter()
    added = cli("index", "add", "--config", str(config), str(refs)).strip()
    add_s = time.perf_counter() - t0
    settings = load_settings(config)
    dim = load_bundle(bundle).manifest.embedding_dim
    ids, vectors, labels = references(settings.paths.state / DB_NAME, dim)
    index = TileIndex(settings.paths.state, settings.retrieval, dim, read_only=True)
    t0 = time.perf_counter()
    hits = index.search_batch(vectors, K, exclude=[int(i) for i in ids])
    search_s = time.perf_counter() - t0
    label_of = dict(zip(ids.tolist(), labels.tolist(), strict=True))
    ranked = np.zeros((len(ids), K), bool)
    for q, row in enumerate(hits):
        assert ids[q] not in {h.id for h in row}, "a query found itself"
        ranked[q, :len(row)] = [label_of[h.id] == labels[q] for h in row]
    counts = {lab: int((labels == lab).sum()) for lab in set(labels.tolist())}
    n_relevant = np.asarray([counts[lab] - 1 for lab in labels])
    # The shell path: one query per class image through `terratile query --image`.
    cli_top1 = []
    for lab in sorted(counts)[:5]:
        image = next(p for p in sorted((refs / lab).iterdir()))
        reply = json.loads(cli("query", "--config", str(config), "--image", str(image),
                               "-k", str(K), "--json"))
        cli_top1.append(reply["results"][0]["source"] == f"{lab}/{image.name}")
    stats = index.stats()
    index.close()
    return {
        "bundle": str(bundle), "model": load_bundle(bundle).manifest.name,
        "backbone": load_bundle(bundle).manifest.backbone, "images": n_images,
        "indexed": len(ids), "classes": len(counts), "cli_add": added,
        "add_seconds": round(add_s, 1), "search_seconds": round(search_s, 3),
        f"map_at_{K}": round(map_at_k(ranked, n_relevant, K), 4),
        f"precision_at_{K}": round(precision_at_k(ranked, K), 4),
        "cli_query_finds_itself_first": all(cli_top1), "index_type": stats["type"],
        "embedding_dim": dim,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--split", type=Path, required=True)
    parser.add_argument("--name", required=True, help="Key in the results file.")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tt-aid-") as tmp:
        result = evaluate(args.bundle, args.split, Path(tmp))
    result["split"] = str(args.split)
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    results[args.name] = result
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
