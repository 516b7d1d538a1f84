"""GPU provider path of ``appliance.model.runtime``: which providers really run, parity, img/s.

One real bundle (default: the fine-tuned EfficientNet-Lite0 AID bundle) is opened with
three provider plans, CPU first as the reference:

* ``cpu`` → ``("cpu",)``; ``cuda`` → ``("cuda", "cpu")``; ``tensorrt`` → ``("tensorrt",
  "cuda", "cpu")`` (engine cache in a temporary folder).

For each plan it records the providers the backbone actually got (and those the heads
were narrowed to), every FALLBACK warning of the runtime together with what onnxruntime
itself printed while the sessions opened (captured from the process's stdout/stderr file
descriptors), the open + warm-up time (a TensorRT engine build lands there), parity
against the CPU plan on the same real tiles (max |Δ| of features, probabilities and
embeddings, arg-max agreement), and throughput of ``runtime.infer`` per batch size next
to a raw onnxruntime session of the backbone alone on the same providers (``ratio`` =
runtime time / raw time: what normalisation on the host and the two head sessions cost).
A plan that fell back to CPU entirely is not timed again: its figures are the CPU ones.

Tiles: ``--tiles`` (an ``.npz`` cache, float16 [N,C,S,S] in the model's value range),
built on first use from AID JPEGs (``--aid``, through ``appliance.retrieval.image.read_tile``
so they are read exactly as the appliance reads a query image) when the AID data are
there; synthetic smooth tiles otherwise (recorded as such). The cache lets a machine
without the data set or rasterio (the GPU box) use the very same tiles.

Results are merged into ``--out`` under ``runs[<label>]`` (label: the GPU's name from
``nvidia-smi``, else ``no-gpu``), so a CPU-only run and a GPU run sit side by side.
This script never imports torch.

    .venv/bin/python benchmarks/gpu_runtime.py [--bundle DIR] [--batches 32 128 256]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from appliance.contract.bundle import BACKBONE, FEATURES, IMAGE_INPUT, Bundle, load_bundle
from appliance.model.runtime import Inference, ModelRuntime, ProviderPlan, open_session

RESULTS = ROOT / "benchmarks" / "results" / "gpu_runtime.json"
CARRIED_BUNDLE = ROOT / ".gpu" / "bundle"
REAL_BUNDLE = Path("/work/runs/aid_ft/bundle")
TILE_CACHE = ROOT / ".gpu" / "aid_tiles.npz"
AID = Path("/work/shared/data/aid")
PLANS: dict[str, tuple[str, ...]] = {
    "cpu": ("cpu",),
    "cuda": ("cuda", "cpu"),
    "tensorrt": ("tensorrt", "cuda", "cpu"),
}


class _Records(logging.Handler):
    """Keeps the runtime's warnings (the FALLBACK lines) for the results file."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def captured_fds() -> Iterator[list[str]]:
    """Everything written to fds 1 and 2 inside the block (onnxruntime's C++ log and its
    Python fallback prints), returned as lines and echoed to the real stderr afterwards."""
    lines: list[str] = []
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    with tempfile.TemporaryFile(mode="w+b") as sink:
        for fd in (1, 2):
            os.dup2(sink.fileno(), fd)
        try:
            yield lines
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd, copy in saved.items():
                os.dup2(copy, fd)
                os.close(copy)
            sink.seek(0)
            text = sink.read().decode(errors="replace")
            sys.stderr.write(text)
            # Strip terminal colour codes; keep non-empty lines.
            for line in text.replace("\x1b[m", "").splitlines():
                clean = line.replace("\x1b[1;31m", "").replace("\x1b[0;93m", "").strip()
                if clean:
                    lines.append(clean)


def gpu_name() -> str | None:
    """The first GPU's name from nvidia-smi, or None on a machine without one."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version",
                              "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=30, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out.splitlines()[0] if out else None


def pick_bundle(arg: Path | None) -> Path:
    """``--bundle``, else the carried copy (GPU box), else the AID run's bundle."""
    if arg is not None:
        return arg
    return CARRIED_BUNDLE if CARRIED_BUNDLE.is_dir() else REAL_BUNDLE


def load_tiles(bundle: Bundle, cache: Path, aid: Path, count: int) -> tuple[np.ndarray, str]:
    """[N,C,S,S] float32 tiles in the model's value range and a word on their origin."""
    spec = bundle.manifest.input
    if cache.is_file():
        with np.load(cache) as z:
            tiles = z["tiles"].astype(np.float32)
        if tiles.shape[1:] != (len(spec.bands), spec.size, spec.size):
            raise SystemExit(f"{cache}: tiles {tiles.shape[1:]} do not fit the bundle input")
        return tiles, f"AID cache {cache.name}"
    if aid.is_dir():
        # Only here (the workstation): the appliance's own image reader needs rasterio.
        from appliance.config import InputConfig
        from appliance.retrieval.image import read_tile

        classes = sorted(p for p in aid.iterdir() if p.is_dir())
        per_class = -(-count // len(classes))
        paths = [f for c in classes for f in sorted(c.glob("*.jpg"))[:per_class]][:count]
        tiles = np.stack([read_tile(p, spec, InputConfig()) for p in paths])
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(cache, tiles=tiles.astype(np.float16))
        # The cached (float16) values are what every run uses, here included.
        return tiles.astype(np.float16).astype(np.float32), f"AID ({len(paths)} JPEGs)"
    rng = np.random.default_rng(0)
    lo, hi = spec.value_range
    coarse = rng.uniform(lo, hi, (count, len(spec.bands), 8, 8)).astype(np.float32)
    reps = -(-spec.size // 8)
    tiles = coarse.repeat(reps, axis=2).repeat(reps, axis=3)[:, :, :spec.size, :spec.size]
    return np.ascontiguousarray(tiles), "synthetic (no AID data, no cache)"


def timed(fn: Callable[[], object], budget_s: float, min_reps: int = 3,
          max_reps: int = 50) -> float:
    """Median seconds of ``fn`` after two warm-up calls, over ``min_reps``..``max_reps``
    calls or ``budget_s`` seconds, whichever ends first past ``min_reps``."""
    fn()
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps
                                     or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def parity(out: Inference, ref: Inference) -> dict[str, float]:
    """Largest absolute differences to the CPU reference on the same tiles."""
    return {
        "max_abs_d_features": float(np.abs(out.features - ref.features).max()),
        "max_abs_d_probs": float(np.abs(out.probs - ref.probs).max()),
        "max_abs_d_embedding": float(np.abs(out.embedding - ref.embedding).max()),
        "argmax_agreement": float((out.probs.argmax(1) == ref.probs.argmax(1)).mean()),
    }


def throughput(runtime: ModelRuntime, tiles: np.ndarray, batches: list[int],
               budget_s: float) -> dict[str, dict[str, float]]:
    """img/s of ``runtime.infer`` and of a raw backbone session on the same providers."""
    raw = open_session(runtime.bundle.file(BACKBONE), runtime.plan)
    table: dict[str, dict[str, float]] = {}
    for b in batches:
        x = np.resize(tiles, (b, *tiles.shape[1:])).astype(np.float32)
        xn = runtime.manifest.input.normalise(x)
        t_rt = timed(partial(runtime.infer, x), budget_s)
        t_raw = timed(partial(raw.run, [FEATURES], {IMAGE_INPUT: xn}), budget_s)
        table[str(b)] = {"runtime_img_s": round(b / t_rt, 1),
                         "raw_backbone_img_s": round(b / t_raw, 1),
                         "runtime_ms_per_batch": round(t_rt * 1e3, 2),
                         "raw_backbone_ms_per_batch": round(t_raw * 1e3, 2),
                         "ratio_runtime_over_raw": round(t_rt / t_raw, 3)}
        print(f"  batch {b:4d}: runtime {b / t_rt:9.1f} img/s, raw backbone {b / t_raw:9.1f} img/s",
              file=sys.stderr)
    return table


def run_plan(name: str, bundle: Bundle, tiles: np.ndarray, ref: Inference | None,
             batches: list[int], budget_s: float,
             trt_cache: Path) -> tuple[dict[str, Any], Inference]:
    """Open, warm up, check parity and time one provider plan."""
    print(f"plan {name}: {PLANS[name]}", file=sys.stderr)
    records = _Records()
    logger = logging.getLogger("appliance.model.runtime")
    logger.addHandler(records)
    try:
        with captured_fds() as ort_output:
            t0 = time.perf_counter()
            runtime = ModelRuntime(bundle, ProviderPlan(providers=PLANS[name], trt_cache=trt_cache))
            t_open = time.perf_counter() - t0
            runtime.warmup(batch=len(tiles))
            t_warm = time.perf_counter() - t0 - t_open
    finally:
        logger.removeHandler(records)
    out = runtime.infer(tiles)
    fell_back = name != "cpu" and runtime.providers[0] == "CPUExecutionProvider"
    result: dict[str, Any] = {
        "requested": list(PLANS[name]),
        "backbone_providers": runtime.providers,
        "head_plan": list(runtime.plan.providers),
        "fell_back_to_cpu": fell_back,
        "runtime_warnings": records.messages,
        "onnxruntime_output": ort_output[-12:],
        "open_s": round(t_open, 3),
        "warmup_s": round(t_warm, 3),
        "parity_vs_cpu": parity(out, ref) if ref is not None else None,
    }
    if fell_back:
        result["throughput"] = "same as cpu (plan fell back to CPUExecutionProvider)"
    else:
        result["throughput"] = throughput(runtime, tiles, batches, budget_s)
    if name == "cuda" and not fell_back and ref is not None:
        result["cuda_without_tf32"] = without_tf32(runtime, tiles, ref, max(batches), budget_s)
    return result, out


def without_tf32(runtime: ModelRuntime, tiles: np.ndarray, ref: Inference, batch: int,
                 budget_s: float) -> dict[str, Any]:
    """The raw backbone on CUDA with TF32 off: parity and speed of strict fp32.

    onnxruntime's CUDA provider computes fp32 convolutions and matmuls in TF32 on Ampere
    and later by default (10-bit mantissa), which is what a GPU/CPU difference of ~1e-3
    relative comes from; this says what turning it off would buy and cost.
    """
    try:
        session = ort.InferenceSession(
            str(runtime.bundle.file(BACKBONE)),
            providers=[("CUDAExecutionProvider", {"use_tf32": 0}), "CPUExecutionProvider"])
    except (RuntimeError, ValueError) as exc:
        return {"error": str(exc)}
    xn = runtime.manifest.input.normalise(tiles)
    feats = np.asarray(session.run([FEATURES], {IMAGE_INPUT: xn})[0], np.float32)
    x = runtime.manifest.input.normalise(np.resize(tiles, (batch, *tiles.shape[1:])))
    t = timed(partial(session.run, [FEATURES], {IMAGE_INPUT: x}), budget_s)
    return {"providers": session.get_providers(),
            "max_abs_d_features": float(np.abs(feats - ref.features).max()),
            f"raw_backbone_img_s_batch_{batch}": round(batch / t, 1)}


def merge(out: Path, label: str, run: dict[str, Any]) -> dict[str, Any]:
    """The results file with ``runs[label]`` replaced by this run."""
    doc: dict[str, Any] = json.loads(out.read_text()) if out.is_file() else {}
    doc.setdefault("benchmark", "benchmarks/gpu_runtime.py")
    doc.setdefault("runs", {})[label] = run
    return doc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, default=None)
    parser.add_argument("--tiles", type=Path, default=TILE_CACHE)
    parser.add_argument("--aid", type=Path, default=AID)
    parser.add_argument("--count", type=int, default=128, help="parity tiles")
    parser.add_argument("--batches", type=int, nargs="+", default=[32, 128, 256])
    parser.add_argument("--budget", type=float, default=2.0, help="seconds per timed cell")
    parser.add_argument("--plans", nargs="+", choices=list(PLANS), default=list(PLANS))
    parser.add_argument("--label", default=None, help="runs[] key (default: GPU name)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    bundle_dir = pick_bundle(args.bundle)
    bundle = load_bundle(bundle_dir)
    tiles, tile_source = load_tiles(bundle, args.tiles, args.aid, args.count)
    gpu = gpu_name()
    plans = ["cpu"] + [p for p in args.plans if p != "cpu"]
    results: dict[str, Any] = {}
    ref: Inference | None = None
    with tempfile.TemporaryDirectory() as tmp:
        for name in plans:
            results[name], out = run_plan(name, bundle, tiles, ref, args.batches, args.budget,
                                          Path(tmp) / "trt-cache")
            ref = out if name == "cpu" else ref
    build = getattr(ort.capi, "build_and_package_info", None)
    run = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "gpu": gpu,
        "host": {"cpus": os.cpu_count(), "python": platform.python_version(),
                 "machine": platform.machine()},
        "onnxruntime": {"version": ort.__version__,
                        "package": getattr(build, "package_name", None),
                        "cuda_version": getattr(build, "cuda_version", None),
                        "available_providers": ort.get_available_providers()},
        "bundle": {"path": str(bundle_dir), "name": bundle.manifest.name,
                   "backbone": bundle.manifest.backbone, "input_size": bundle.manifest.input.size,
                   "precision": bundle.manifest.metrics.get("precision")},
        "tiles": {"count": len(tiles), "source": tile_source},
        "batches": args.batches,
        "plans": results,
    }
    label = args.label or (gpu.split(",")[0].strip() if gpu else "no-gpu")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(merge(args.out, label, run), indent=2) + "\n")
    print(json.dumps(run, indent=2))


if __name__ == "__main__":
    main()
