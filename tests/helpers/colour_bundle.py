"""A tiny, deterministic bundle for appliance tests: a colour classifier built with onnx.helper.

Exporting a real network with torch takes seconds per test session and its predictions on
synthetic scenes are arbitrary; the appliance does not care where its ONNX came from, and
tests need predictable classes. This bundle's backbone is global average pooling followed
by a fixed linear map, its classifier recovers the dominant colour, so a synthetic scene
painted red / green / blue has known classes. Real torch-exported bundles are covered by
tests/export and the end-to-end tests.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from appliance.contract.bundle import (
    BACKBONE,
    CLASSIFIER,
    EMBEDDER,
    EMBEDDING,
    FEATURES,
    IMAGE_INPUT,
    LAYER_STATS,
    LOGITS,
    REFERENCE,
    SOURCE_BANK,
    ClassSpec,
    InputSpec,
    Manifest,
    SourceBank,
    holdout_rows,
    read_manifest,
    seal_bundle,
)
from appliance.contract.layer_stats import measure
from appliance.contract.reference_stats import build_reference

CLASSES = [("urban", (200, 40, 40)), ("vegetation", (40, 160, 40)), ("water", (40, 40, 200))]
PURE = {"urban": (200, 30, 30), "vegetation": (30, 200, 30), "water": (30, 30, 200)}
FEATURE_DIM = 8
EMBED_DIM = 6
INPUT_SIZE = 32
SHARPNESS = 8.0
ML_THRESHOLDS = {"urban": 0.5, "vegetation": 0.4, "water": 0.6}


def _mixing() -> np.ndarray:
    rng = np.random.default_rng(7)
    q, _ = np.linalg.qr(rng.normal(size=(FEATURE_DIM, FEATURE_DIM)))
    return q[:3].astype(np.float32)  # [3, D] with orthonormal rows


def _save(graph: onnx.GraphProto, path: Path) -> None:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)


def backbone_graph() -> onnx.GraphProto:
    """An identity 1×1 ``Conv`` (a layer to re-normalise, as in a real CNN), then the mean
    colour of the tile, mixed into ``FEATURE_DIM`` dimensions."""
    a = _mixing()
    return helper.make_graph(
        [helper.make_node("Conv", [IMAGE_INPUT, "C", "c"], ["conv"]),
         helper.make_node("GlobalAveragePool", ["conv"], ["pooled"]),
         helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
         helper.make_node("MatMul", ["flat", "A"], [FEATURES])],
        "backbone",
        [helper.make_tensor_value_info(IMAGE_INPUT, TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info(FEATURES, TensorProto.FLOAT, ["N", FEATURE_DIM])],
        [numpy_helper.from_array(a, "A"),
         numpy_helper.from_array(np.eye(3, dtype=np.float32).reshape(3, 3, 1, 1), "C"),
         numpy_helper.from_array(np.zeros(3, np.float32), "c")],
    )


def classifier_weights() -> tuple[np.ndarray, np.ndarray]:
    """W [D,K], b [K]: logits = SHARPNESS * (normalised mean colour)."""
    a = _mixing()
    return (a.T * SHARPNESS).astype(np.float32), np.zeros(3, np.float32)


def classifier_graph(w: np.ndarray, b: np.ndarray) -> onnx.GraphProto:
    return helper.make_graph(
        [helper.make_node("Gemm", [FEATURES, "W", "b"], [LOGITS])],
        "classifier",
        [helper.make_tensor_value_info(FEATURES, TensorProto.FLOAT, ["N", FEATURE_DIM])],
        [helper.make_tensor_value_info(LOGITS, TensorProto.FLOAT, ["N", w.shape[1]])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")],
    )


def embedder_graph() -> onnx.GraphProto:
    p = np.random.default_rng(11).normal(size=(FEATURE_DIM, EMBED_DIM)).astype(np.float32)
    return helper.make_graph(
        [helper.make_node("MatMul", [FEATURES, "P"], ["proj"]),
         helper.make_node("LpNormalization", ["proj"], [EMBEDDING], axis=1, p=2)],
        "embedder",
        [helper.make_tensor_value_info(FEATURES, TensorProto.FLOAT, ["N", FEATURE_DIM])],
        [helper.make_tensor_value_info(EMBEDDING, TensorProto.FLOAT, ["N", EMBED_DIM])],
        [numpy_helper.from_array(p, "P")],
    )


def source_colours(n_per_class: int = 60, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Noisy versions of the pure class colours: [N,3] values 0..255 and labels [N]."""
    rng = np.random.default_rng(seed)
    rows, labels = [], []
    for k, name in enumerate(PURE):
        base = np.asarray(PURE[name], np.float32)
        rows.append(np.clip(base + rng.normal(0, 15, size=(n_per_class, 3)), 0, 255))
        labels.append(np.full(n_per_class, k))
    return np.concatenate(rows).astype(np.float32), np.concatenate(labels)


def build_colour_bundle(out: Path, version: int = 1, name: str = "colour-test",
                        multi_label: bool = False) -> Path:
    """Write and seal a complete, valid bundle into ``out``; returns ``out``.

    ``multi_label``: the same graphs as a multi-label bundle (sigmoid per colour channel, so
    a yellow tile is urban AND vegetation), per-label thresholds ``ML_THRESHOLDS``.
    """
    out.mkdir(parents=True, exist_ok=True)
    _save(backbone_graph(), out / BACKBONE)
    w, b = classifier_weights()
    _save(classifier_graph(w, b), out / CLASSIFIER)
    _save(embedder_graph(), out / EMBEDDER)
    colours, labels = source_colours()
    norm = (colours - 127.5) / 127.5
    features = (norm @ _mixing()).astype(np.float32)
    logits = features @ w + b
    z = np.exp(logits - logits.max(1, keepdims=True))
    probs = 1 / (1 + np.exp(-logits)) if multi_label else z / z.sum(1, keepdims=True)
    bank_labels = (np.eye(3, dtype=np.uint8)[labels] if multi_label
                   else labels.astype(np.int64))
    SourceBank(features, bank_labels, holdout_rows(bank_labels)).save(out / SOURCE_BANK)
    reference = build_reference(["red", "green", "blue"], colours, features, probs)
    (out / REFERENCE).write_text(reference.model_dump_json(by_alias=True))
    tiles = np.broadcast_to(norm[:, :, None, None], (len(norm), 3, 4, 4)).astype(np.float32)
    measure(out / BACKBONE, tiles).save(out / LAYER_STATS)
    manifest = Manifest(
        name=name, version=version, backbone="colour-gap",
        task="multi-label" if multi_label else "single-label",
        classes=[ClassSpec(name=n, colour=c, threshold=ML_THRESHOLDS[n] if multi_label else None)
                 for n, c in CLASSES],
        input=InputSpec(bands=["red", "green", "blue"], value_range=(0, 255), scale=1.0,
                        mean=[127.5] * 3, std=[127.5] * 3, size=INPUT_SIZE),
        scales=[16, 32], feature_dim=FEATURE_DIM, embedding_dim=EMBED_DIM,
        metrics={"overall_accuracy": 1.0}, files={LAYER_STATS: ""},
    )
    seal_bundle(out, manifest)
    return out


def versioned_copy(src: Path, dst: Path, version: int, parent: int | None,
                   head_bias: float = 0.0) -> Path:
    """A copy of bundle ``src`` sealed as ``version`` with ``parent``; a non-zero
    ``head_bias`` changes its classifier (an adapted head: same backbone, new head file)."""
    shutil.copytree(src, dst)
    if head_bias:
        w, b = classifier_weights()
        shift = np.float32(head_bias) * np.array([1, 0, -1], np.float32)  # favours urban
        _save(classifier_graph(w, b + shift), dst / "classifier.onnx")
    manifest = read_manifest(dst).model_copy(update={"version": version, "parent": parent})
    seal_bundle(dst, manifest)
    return dst
