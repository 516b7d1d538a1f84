"""int8 on the CPU: dynamic vs static (QDQ, calibrated) quantisation of a bundle's backbone.

Takes the fp32 ``backbone.onnx`` of a bundle (default: the fine-tuned AID bundle), makes

* ``dynamic``: ``onnxruntime.quantization.quantize_dynamic`` after the same pre-processing
  (int8 weights, activations quantised on the fly per batch);
* ``static``: ``export.bundler.quantise_int8`` — what ``terratile-export bundle --int8``
  writes: QDQ, per-channel weights, activation ranges calibrated on 128 training chips;

and times each on CPU onnxruntime (batch 32 at the bundle's input size, best and median of
``--repeats`` interleaved runs), with the agreement of the bundle's classifier on its
features vs fp32 and the overall accuracy on the held-out split (``--run``'s ``split.json``).

    .venv/bin/python benchmarks/export_quant.py [--bundle /work/runs/aid_ft/bundle]

Writes ``benchmarks/results/export_quant.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from onnxruntime.quantization import QuantType, quantize_dynamic
from onnxruntime.quantization.shape_inference import quant_pre_process

from appliance.contract.bundle import BACKBONE, CLASSIFIER, load_bundle
from appliance.model.runtime import ProviderPlan, open_session
from export.bundler import quantise_int8
from export.data import load_chips, load_split

ROOT = Path(__file__).resolve().parents[1]
PLAN = ProviderPlan(providers=("cpu",), intra_op_threads=2)


def _time(sessions: dict[str, ort.InferenceSession], x: np.ndarray,
          repeats: int) -> dict[str, dict[str, float]]:
    """Best and median seconds per batch, the models interleaved round-robin so that load
    from other jobs on a shared CPU hits all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for session in sessions.values():
        session.run(None, {"image": x})
    for _ in range(repeats):
        for name, session in sessions.items():
            t0 = time.perf_counter()
            session.run(None, {"image": x})
            times[name].append(time.perf_counter() - t0)
    return {name: {"batch32_seconds_best": min(t), "batch32_seconds_median": statistics.median(t)}
            for name, t in times.items()}


def _predict(backbone: ort.InferenceSession, head: ort.InferenceSession,
             x: np.ndarray) -> np.ndarray:
    feats = np.concatenate([backbone.run(None, {"image": x[i : i + 64]})[0]
                            for i in range(0, len(x), 64)])
    return np.asarray(head.run(None, {"features": feats})[0]).argmax(axis=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=Path("/work/runs/aid_ft/bundle"))
    parser.add_argument("--run", type=Path, default=None, help="default: the bundle's parent")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/export_quant.json")
    args = parser.parse_args()
    bundle = load_bundle(args.bundle)
    spec = bundle.manifest.input
    run = args.run or args.bundle.parent
    val = load_split(run, "val")
    train = load_split(run, "train")
    step = max(1, len(train.samples) // 128)
    calib = spec.normalise(load_chips(train.subset(list(range(0, len(train.samples), step))[:128]),
                                      spec.size).images)
    x_val = spec.normalise(load_chips(val, spec.size).images)
    truth = val.label_array()
    names = bundle.manifest.class_names
    truth = np.asarray([names.index(val.classes[k]) for k in truth])
    head = open_session(bundle.file(CLASSIFIER), PLAN)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"fp32": Path(tmp) / "fp32.onnx", "dynamic": Path(tmp) / "dynamic.onnx",
                 "static": Path(tmp) / "static.onnx"}
        shutil.copy(bundle.file(BACKBONE), paths["fp32"])
        t0 = time.perf_counter()
        prepped = Path(tmp) / "prep.onnx"
        quant_pre_process(str(paths["fp32"]), str(prepped), skip_symbolic_shape=True)
        quantize_dynamic(str(prepped), str(paths["dynamic"]), weight_type=QuantType.QInt8)
        dyn_s = time.perf_counter() - t0
        shutil.copy(paths["fp32"], paths["static"])
        t0 = time.perf_counter()
        quantise_int8(paths["static"], calib)
        static_s = time.perf_counter() - t0
        reference = None
        sessions = {name: open_session(path, PLAN) for name, path in paths.items()}
        timings = _time(sessions, x_val[:32], args.repeats)
        for name, session in sessions.items():
            pred = _predict(session, head, x_val)
            reference = pred if reference is None else reference
            results[name] = {
                **timings[name],
                "overall_accuracy": float((pred == truth).mean()),
                "agreement_with_fp32": float((pred == reference).mean()),
                "size_mb": paths[name].stat().st_size / 1e6,
            }
        results["dynamic"]["quantise_seconds"] = dyn_s
        results["static"]["quantise_seconds"] = static_s
    for name in ("dynamic", "static"):
        results[name]["speedup_vs_fp32"] = (results["fp32"]["batch32_seconds_best"]
                                            / results[name]["batch32_seconds_best"])
    doc = {"benchmark": "export_quant", "bundle": str(args.bundle), "input_size": spec.size,
           "held_out_chips": len(truth), "calibration_chips": len(calib),
           "onnxruntime": ort.__version__, "cpus": os.cpu_count(),
           "note": "CPU shared with other jobs; speedup from best-of interleaved runs",
           "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
