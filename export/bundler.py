"""``terratile-export bundle``: a trained run → a sealed model bundle (the bundle contract).

Three ONNX graphs (backbone, classifier, embedder) exported with ``torch.onnx.export``,
checked against torch on real training chips (fp32 parity must be within 1e-4), optionally
converted to fp16 or statically quantised to int8 (QDQ, calibrated on real chips); then the
source bank and drift reference are computed with the EXPORTED graphs through onnxruntime
(what the appliance will see) and everything is sealed with sha256 by
``appliance.contract.bundle.seal_bundle``.
"""

from __future__ import annotations

import json
import logging
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process
from rich.console import Console
from torch import nn

from appliance.contract.bundle import (
    BACKBONE,
    CLASSIFIER,
    DEFAULT_SCALES,
    EMBEDDER,
    EMBEDDING,
    FEATURES,
    IMAGE_INPUT,
    LAYER_STATS,
    LOGITS,
    REFERENCE,
    SOURCE_BANK,
    BundleTta,
    InputSpec,
    Manifest,
    SourceBank,
    holdout_rows,
    seal_bundle,
)
from appliance.contract.durable import atomic_write_text
from appliance.contract.image_files import is_image
from appliance.contract.layer_stats import measure
from appliance.contract.palette import read_palette, semantic_palette
from appliance.contract.reference_stats import reference_from_tiles
from appliance.model.runtime import ProviderPlan, open_session, probabilities
from appliance.model.tta import d4_views, mean_over_views, view_count
from export.data import DataError, DataSet, Sample, load_chips, load_split
from export.input_size import candidate_sizes, choose_input_size, validation_by_input_size
from export.metrics import calibrate_thresholds, overlap_retrieval_report
from export.model import Descriptor, Embedder, TerratileNet
from export.train import METRICS, load_trained

log = logging.getLogger(__name__)

Precision = Literal["fp32", "fp16", "int8"]
FP32_TOLERANCE = 1e-4
OPSET = 18
CPU = ProviderPlan(providers=("cpu",))
BANK_PER_CLASS = 48
PARITY_CHIPS = 16
# (embedding, posterior) weights tried for a multi-label descriptor: embedding alone, both
# with more or less posterior, posterior alone.
DESCRIPTOR_WEIGHTS: tuple[tuple[float, float], ...] = (
    (1.0, 0.0), (1.0, 0.5), (1.0, 1.0), (1.0, 2.0), (1.0, 4.0), (0.0, 1.0))

class ParityError(RuntimeError):
    """The exported ONNX disagrees with torch beyond the tolerance."""


@dataclass(frozen=True)
class BundleOptions:
    """What ``bundle`` writes: precision, calibration data, version and name, scales."""

    precision: Precision = "fp32"
    calibration: Path | None = None
    version: int = 1
    name: str | None = None
    scales: tuple[int, ...] = DEFAULT_SCALES
    notes: str = ""
    descriptor: Literal["trained", "pooled"] = "trained"
    gsd: float | None = None  # metres per pixel of the training chips (None: the run's)
    palette: Path | None = None  # class colours file (None: the semantic palette)
    tta: BundleTta = "none"  # test-time augmentation the box runs unless model.tta is off
    # Network input the box resizes tiles to (None: the training size; "auto": the best of
    # a few sizes on the run's validation chips). A larger size than trained on shows
    # objects at the scale the random-resized training crops did (FixRes).
    input_size: int | Literal["auto"] | None = None


def export_onnx(module: nn.Module, example: torch.Tensor, path: Path, input_name: str,
                output_name: str) -> str:
    """Export ``module`` with a dynamic batch axis; returns which exporter produced it.

    The dynamo exporter (onnxscript) is tried first as torch's default, written as one
    file (``external_data=False``); models it cannot trace fall back to the TorchScript
    exporter (``dynamo=False``). The result is checked with ``onnx.checker``.
    """
    module = module.eval()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module, (example,), input_names=[input_name], output_names=[output_name],
                dynamic_shapes={_arg_name(module): {0: torch.export.Dim("N", min=1, max=4096)}},
                opset_version=OPSET, dynamo=True, external_data=False, verbose=False,
            )
        assert program is not None
        program.save(str(path), external_data=False)
        exporter = "dynamo"
    except Exception as exc:  # the dynamo exporter raises many kinds on untraceable code
        log.info("dynamo export failed (%s); using the TorchScript exporter", exc)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (example,), str(path), input_names=[input_name],
                              output_names=[output_name], opset_version=17, dynamo=False,
                              dynamic_axes={input_name: {0: "N"}, output_name: {0: "N"}})
        exporter = "torchscript"
    onnx.checker.check_model(str(path))
    return exporter


def _arg_name(module: nn.Module) -> str:
    import inspect

    return next(iter(inspect.signature(module.forward).parameters))


class _FeatureToLogits(nn.Module):
    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)


def _to_fp16(path: Path) -> None:
    """Weights and activations in fp16, float32 at the graph's inputs and outputs."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(path)), keep_io_types=True)
    onnx.save(model, str(path))


class _ChipReader(CalibrationDataReader):
    """Feeds normalised calibration chips to onnxruntime's static quantiser, 8 at a time."""

    def __init__(self, x: np.ndarray) -> None:
        self._batches: Iterator[np.ndarray] = iter(np.array_split(x, max(1, len(x) // 8)))

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {IMAGE_INPUT: batch}


def quantise_int8(path: Path, calibration: np.ndarray) -> None:
    """Static QDQ int8 (per-channel weights), activations calibrated on real chips.

    Symbolic shape inference is skipped in the pre-processing: it does not handle every
    exported graph, and ONNX shape inference plus graph optimisation are what matter here.
    """
    with tempfile.TemporaryDirectory() as tmp:
        prepped = Path(tmp) / "prep.onnx"
        quant_pre_process(str(path), str(prepped), skip_symbolic_shape=True)
        quantize_static(str(prepped), str(path), _ChipReader(calibration),
                        quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)


def calibration_chips(directory: Path, spec: InputSpec, limit: int = 128) -> np.ndarray:
    """Normalised [N,C,S,S] chips from an ImageFolder or a flat folder of images."""
    files = sorted(p for p in Path(directory).rglob("*") if is_image(p))
    if not files:
        raise FileNotFoundError(f"{directory}: no calibration images")
    step = max(1, len(files) // limit)
    ds = DataSet(Path(directory), ["any"], [Sample(p, (0,)) for p in files[::step][:limit]],
                 "single-label")
    return spec.normalise(load_chips(ds, spec.size).images)


def _run(model: Path | ort.InferenceSession, name_in: str, name_out: str,
         x: np.ndarray) -> np.ndarray:
    """One graph's output on CPU; ``model`` is a file (opened here) or an open session."""
    session = open_session(model, CPU) if isinstance(model, Path) else model
    return np.asarray(session.run([name_out], {name_in: x})[0], np.float32)


def _balanced(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Row indices with at most ``per_class`` rows per (first) class, seeded."""
    rng = np.random.default_rng(seed)
    first = labels if labels.ndim == 1 else labels.argmax(axis=1)
    rows = [rng.permutation(np.flatnonzero(first == k))[:per_class] for k in np.unique(first)]
    return np.sort(np.concatenate(rows))


def bundle(run_dir: Path, out: Path, options: BundleOptions | None = None,
           console: Console | None = None) -> Manifest:
    """Write and seal a bundle for the run in ``run_dir``; returns the sealed manifest."""
    options = options or BundleOptions()
    console = console or Console(stderr=True)
    torch.set_num_threads(2)
    info, model = load_trained(run_dir)
    classes = (read_palette(options.palette, info.classes) if options.palette is not None
               else semantic_palette(info.classes))  # a bad palette file fails before export
    spec = info.input_spec
    size_choice: dict[str, Any] = {}
    if options.input_size == "auto":
        views = view_count(options.tta, "bundle")
        scores = validation_by_input_size(run_dir, candidate_sizes(spec.size), views)
        spec = spec.model_copy(update={"size": choose_input_size(scores)})
        size_choice = {"input_size": {"split": "val", "views": views,
                                      "scores": {str(k): v for k, v in scores.items()}}}
        console.print(f"input size {spec.size} px: validation "
                      + ", ".join(f"{k} px {v:.3f}" for k, v in scores.items()))
    elif options.input_size is not None:
        spec = spec.model_copy(update={"size": options.input_size})
    source = load_split(run_dir, "train")  # the run's own training chips
    labels_all = source.label_array()
    rows = _balanced(labels_all, BANK_PER_CLASS, seed=0)
    chips = load_chips(source.subset(rows.tolist()), spec.size).images
    labels = labels_all[rows]
    out.mkdir(parents=True, exist_ok=True)

    x = torch.from_numpy(spec.normalise(chips[:PARITY_CHIPS]))
    with torch.no_grad():
        feats = model.backbone(x)
    exporter = export_onnx(model.backbone, x[:2], out / BACKBONE, IMAGE_INPUT, FEATURES)
    export_onnx(_FeatureToLogits(model.classifier), feats[:2], out / CLASSIFIER, FEATURES, LOGITS)
    embedder = model.embedder if options.descriptor == "trained" else None
    multi_label = info.task == "multi-label"
    val = _validation(run_dir, spec.size) if multi_label else None
    weights, selection = (1.0, 1.0), None
    if val is not None and embedder is not None:
        weights, selection = _pick_descriptor(model, embedder, source, val, out / BACKBONE, spec)
        console.print(f"descriptor weights (embedding, posterior) {weights}: validation "
                      f"Jaccard@20 {selection['candidates'][str(weights)]:.3f}")
    descriptor = Descriptor(embedder, model.classifier, multi_label, weights).eval()
    export_onnx(descriptor, feats[:2], out / EMBEDDER, FEATURES, EMBEDDING)
    console.print(f"exported with the {exporter} exporter (opset {OPSET})")

    parity = {"fp32": _parity(model, descriptor, out, x)}
    if parity["fp32"]["max_abs_diff"] > FP32_TOLERANCE:
        raise ParityError(f"fp32 ONNX vs torch max abs diff {parity['fp32']['max_abs_diff']:.2e} "
                          f"> {FP32_TOLERANCE:.0e}: {parity['fp32']}")
    if options.precision == "fp16":
        for name in (BACKBONE, CLASSIFIER, EMBEDDER):
            _to_fp16(out / name)
    elif options.precision == "int8":
        if options.calibration is None:
            raise ValueError("--int8 needs --calibration DIR (real chips for activation ranges)")
        quantise_int8(out / BACKBONE, calibration_chips(options.calibration, spec))
    if options.precision != "fp32":
        parity[options.precision] = _parity(model, descriptor, out, x)
    for name, p in parity.items():
        console.print(f"parity {name}: max abs diff features {p['features']:.2e}, "
                      f"logits {p['logits']:.2e}, embedding {p['embedding']:.2e}")

    # Source bank and reference from the exported graphs: what the appliance computes.
    backbone = open_session(out / BACKBONE, CPU)  # once, not per batch
    features = np.concatenate([
        _run(backbone, IMAGE_INPUT, FEATURES, spec.normalise(chips[i : i + 64]))
        for i in range(0, len(chips), 64)])
    probs = probabilities(_run(out / CLASSIFIER, FEATURES, LOGITS, features),
                     info.task == "multi-label")
    n_classes = len(info.classes)
    SourceBank(features, labels, holdout_rows(labels)).save(out / SOURCE_BANK)
    reference = reference_from_tiles(spec.bands, chips, features, probs)
    atomic_write_text(out / REFERENCE, reference.model_dump_json(by_alias=True))
    extra: dict[str, str] = {}
    if options.precision == "fp32":  # re-normalisation on the box rewrites fp32 Conv weights
        measure(out / BACKBONE, spec.normalise(chips)).save(out / LAYER_STATS)
        extra[LAYER_STATS] = ""

    calibration: dict[str, Any] = {}
    if val is not None:  # on the final graphs, after any fp16/int8 conversion
        val_chips, val_labels = val
        # Calibrated on the probabilities the box computes: averaged over the TTA views.
        views = view_count(options.tta, "bundle")
        thresholds = calibrate_thresholds(val_labels,
                                          _probs(out, backbone, val_chips, spec, views))
        classes = [c.model_copy(update={"threshold": round(float(t), 4)})
                   for c, t in zip(classes, thresholds, strict=True)]
        calibration = {"thresholds": {"split": "val", "chips": len(val_labels),
                                      "objective": "per-label F1"}}
        if selection is not None:
            calibration["descriptor"] = selection
    manifest = Manifest(
        name=options.name or Path(run_dir).resolve().name, version=options.version,
        backbone=info.backbone, task=info.task,
        classes=classes,
        palette="custom" if options.palette is not None else "semantic",
        gsd=options.gsd if options.gsd is not None else info.gsd,
        input=spec, scales=list(options.scales), tta=options.tta,
        feature_dim=info.feature_dim,
        embedding_dim=(info.embedding_dim + n_classes if embedder is not None
                       else info.feature_dim),
        metrics=_metrics(run_dir, parity, exporter, options)
        | {"train_input_size": info.input_spec.size} | size_choice | calibration,
        notes=options.notes or f"precision {options.precision}", files=extra,
    )
    return seal_bundle(out, manifest)


def _validation(run_dir: Path, size: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The run's validation chips (value range, at the input size) and labels; None without
    any."""
    try:
        val = load_split(run_dir, "val")
    except DataError:  # trained with --val-fraction 0: nothing to calibrate on
        return None
    return load_chips(val, size).images, val.label_array()


def _features(backbone: Path | ort.InferenceSession, chips: np.ndarray,
              spec: InputSpec) -> np.ndarray:
    """Pooled features of value-range chips through an exported backbone, 64 at a time."""
    return np.concatenate([_run(backbone, IMAGE_INPUT, FEATURES, spec.normalise(chips[i : i + 64]))
                           for i in range(0, len(chips), 64)])


def _probs(out: Path, backbone: ort.InferenceSession, chips: np.ndarray, spec: InputSpec,
           views: int) -> np.ndarray:
    """Sigmoid probabilities of chips through the bundle's exported graphs, averaged over
    ``views`` (1, or the 8 TTA views as the box's runtime does)."""
    head = open_session(out / CLASSIFIER, CPU)
    parts = []
    for i in range(0, len(chips), 32):
        batch = chips[i : i + 32]
        tiles = batch if views == 1 else d4_views(batch)
        logits = _run(head, FEATURES, LOGITS, _features(backbone, tiles, spec))
        parts.append(mean_over_views(probabilities(logits, multi_label=True), views))
    return np.concatenate(parts)


def _pick_descriptor(model: TerratileNet, embedder: Embedder, source: DataSet,
                     val: tuple[np.ndarray, np.ndarray], backbone: Path,
                     spec: InputSpec) -> tuple[tuple[float, float], dict[str, Any]]:
    """Descriptor weights with the best mean Jaccard@20 of validation queries against the
    whole training split (the archive an index would hold), through the exported backbone."""
    session = open_session(backbone, CPU)
    gallery = torch.from_numpy(_features(session, load_chips(source, spec.size).images, spec))
    queries = torch.from_numpy(_features(session, val[0], spec))
    scores: dict[str, float] = {}
    for weights in DESCRIPTOR_WEIGHTS:
        d = Descriptor(embedder, model.classifier, True, weights).eval()
        with torch.no_grad():
            q, g = d(queries).numpy(), d(gallery).numpy()
        scores[str(weights)] = overlap_retrieval_report(
            q, val[1], g, source.label_array())["jaccard_at_20"]
    best = max(DESCRIPTOR_WEIGHTS, key=lambda w: scores[str(w)])
    return best, {"objective": "validation Jaccard@20 against the training split",
                  "weights": list(best), "candidates": scores}


def _parity(model: nn.Module, descriptor: Descriptor, out: Path,
            x: torch.Tensor) -> dict[str, float]:
    """Max abs difference onnxruntime vs torch for each graph, on real chips."""
    with torch.no_grad():
        feats, logits, _ = model(x)
        emb = descriptor(feats)
    ort_feats = _run(out / BACKBONE, IMAGE_INPUT, FEATURES, x.numpy())
    diffs = {
        "features": float(np.abs(ort_feats - feats.numpy()).max()),
        "logits": float(np.abs(_run(out / CLASSIFIER, FEATURES, LOGITS, feats.numpy())
                               - logits.numpy()).max()),
        "embedding": float(np.abs(_run(out / EMBEDDER, FEATURES, EMBEDDING, feats.numpy())
                                  - emb.numpy()).max()),
    }
    diffs["max_abs_diff"] = max(diffs.values())
    return diffs


def _metrics(run_dir: Path, parity: dict[str, dict[str, float]], exporter: str,
             options: BundleOptions) -> dict[str, Any]:
    doc: dict[str, Any] = {"parity": parity, "exporter": exporter, "precision": options.precision,
                           "onnxruntime": ort.__version__, "torch": torch.__version__}
    metrics_file = Path(run_dir) / METRICS
    if metrics_file.is_file():
        train = json.loads(metrics_file.read_text())
        last = train.get("best") or (train["epochs"][-1] if train.get("epochs") else {})
        doc |= {"train_seconds": train.get("train_seconds"), "epochs": last.get("epoch"),
                "val_score": last.get("val_score")}
    return doc

