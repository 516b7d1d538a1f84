"""Layer re-normalisation of a BN-folded ONNX backbone, on a small real Conv graph."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from appliance.adapt.renorm import renormalise
from appliance.contract.bundle import FEATURES, IMAGE_INPUT
from appliance.contract.layer_stats import LayerStats, RenormError, conv_layers, measure


def _backbone(path: Path) -> Path:
    """Conv(3→4, 3×3, bias) → Relu → Conv(4→4, 1×1, stride 2, no bias) → global mean: [N,4].

    The stride makes the layers' outputs of different sizes (8² and 4² positions), as in a
    real CNN: statistics must be normalised per layer."""
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("Conv", [IMAGE_INPUT, "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["c1"], ["r1"]),
         helper.make_node("Conv", ["r1", "w2"], ["c2"], strides=[2, 2]),
         helper.make_node("GlobalAveragePool", ["c2"], ["gap"]),
         helper.make_node("Flatten", ["gap"], [FEATURES], axis=1)],
        "backbone",
        [helper.make_tensor_value_info(IMAGE_INPUT, TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info(FEATURES, TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(rng.normal(0, 0.5, (4, 3, 3, 3)).astype(np.float32), "w1"),
         numpy_helper.from_array(rng.normal(0, 0.1, 4).astype(np.float32), "b1"),
         numpy_helper.from_array(rng.normal(0, 0.5, (4, 4, 1, 1)).astype(np.float32), "w2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _inputs(n: int, gain: float = 1.0, offset: float = 0.0, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.normal(0, 1, (n, 3, 8, 8)) * gain + offset).astype(np.float32)


def _features(model: onnx.ModelProto | Path, x: np.ndarray) -> np.ndarray:
    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return np.asarray(session.run([FEATURES], {IMAGE_INPUT: x})[0])


def _later() -> float:
    return time.monotonic() + 60


def test_measure_gives_channel_statistics_of_every_conv(tmp_path: Path) -> None:
    backbone = _backbone(tmp_path / "b.onnx")
    stats = measure(backbone, _inputs(64))
    assert stats.names == ["c1", "c2"]
    assert [m.shape for m in stats.mean] == [(4,), (4,)]
    assert all((v > 0).all() for v in stats.var)
    stats.save(tmp_path / "s.npz")
    again = LayerStats.load(tmp_path / "s.npz")
    assert again.names == stats.names
    np.testing.assert_allclose(again.var[1], stats.var[1])


def test_blend_zero_changes_nothing(tmp_path: Path) -> None:
    backbone = _backbone(tmp_path / "b.onnx")
    source = measure(backbone, _inputs(64))
    shifted = _inputs(32, gain=2.0, offset=1.0, seed=2)
    out = renormalise(backbone, shifted, source, blend=0.0, deadline=_later())
    assert out.layers == 2 and out.tiles == 32
    np.testing.assert_allclose(_features(out.model, shifted), _features(backbone, shifted),
                                rtol=1e-5, atol=1e-5)


def test_full_blend_restores_source_statistics_layer_by_layer(tmp_path: Path) -> None:
    """AdaBN's property, on folded convs: on target data every adapted layer has the
    source's channel statistics, the later one measured through the corrected earlier one."""
    backbone = _backbone(tmp_path / "b.onnx")
    source = measure(backbone, _inputs(256))
    shifted = _inputs(256, gain=0.4, offset=0.8, seed=3)
    out = renormalise(backbone, shifted, source, blend=1.0, deadline=_later())
    assert out.shift_before > 0.1
    adapted = tmp_path / "adapted.onnx"
    onnx.save(out.model, str(adapted))
    after = measure(adapted, shifted)
    before = measure(backbone, shifted)
    for k in range(2):
        np.testing.assert_allclose(after.mean[k], source.mean[k], atol=1e-3)
        np.testing.assert_allclose(after.var[k], source.var[k], rtol=1e-3)
        assert not np.allclose(before.var[k], source.var[k], rtol=0.05)
    # The bias-less Conv got a bias; the graph is otherwise the same.
    assert len(conv_layers(out.model)[1].input) == 3
    assert [n.op_type for n in out.model.graph.node] == ["Conv", "Relu", "Conv",
                                                         "GlobalAveragePool", "Flatten"]


def test_a_half_blend_lands_between(tmp_path: Path) -> None:
    backbone = _backbone(tmp_path / "b.onnx")
    source = measure(backbone, _inputs(256))
    shifted = _inputs(256, gain=0.4, offset=0.8, seed=3)
    full = _features(renormalise(backbone, shifted, source, 1.0, _later()).model, shifted)
    half = _features(renormalise(backbone, shifted, source, 0.5, _later()).model, shifted)
    none = _features(backbone, shifted)
    assert 0 < np.abs(half - none).mean() < np.abs(full - none).mean()


def test_deadline_stops_before_the_first_layer(tmp_path: Path) -> None:
    backbone = _backbone(tmp_path / "b.onnx")
    source = measure(backbone, _inputs(16))
    out = renormalise(backbone, _inputs(16, gain=2.0), source, 1.0, time.monotonic() - 1)
    assert out.layers == 0
    x = _inputs(4)
    np.testing.assert_allclose(_features(out.model, x), _features(backbone, x), atol=1e-6)


def test_statistics_of_another_backbone_are_refused(tmp_path: Path) -> None:
    backbone = _backbone(tmp_path / "b.onnx")
    other = LayerStats(["x"], [np.zeros(4)], [np.ones(4)])
    with pytest.raises(RenormError, match="re-export the bundle"):
        renormalise(backbone, _inputs(8), other, 0.5, _later())
