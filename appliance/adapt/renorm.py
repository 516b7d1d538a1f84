"""Layer re-normalisation: the backbone's channel statistics, blended towards a new domain.

Batch normalisation is where a CNN stores what its training imagery looked like, layer by
layer; blur, haze or another sensor's response move those statistics, and a head trained
on the source cannot undo that (on AID, even true labels recover only a third of a blur
shift through the head). Re-estimating the statistics on target imagery (AdaBN) works,
but resetting them fully on few images is harmful; blending target into source statistics
(Schneider et al. 2020, "covariate shift adaptation") is the robust form.

Exported backbones carry no ``BatchNormalization`` nodes: the exporter folds them into
the preceding ``Conv``. The same correction is therefore applied to every ``Conv`` output:
per channel, ``y ↦ a·y + c`` with ``a = σ_s / σ_b`` and ``c = μ_s − a·μ_b``, where ``μ_s``,
``σ_s`` are source statistics (``layer_stats.npz``, measured by the exporter on training
chips) and ``μ_b``, ``σ_b`` the blend of source and target statistics. The map is folded
into the ``Conv``'s own weight and bias, so the adapted backbone is the same graph with new
initializers: same cost, same TensorRT support, no torch on the box. Layers are corrected
in graph order, each measured with every earlier layer already corrected, as a forward
pass in training mode would.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from appliance.contract.layer_stats import LayerProbe, LayerStats, RenormError, conv_layers


@dataclass(frozen=True)
class Renormalised:
    """An adapted backbone and how far its layers had moved (mean |log σ_t/σ_s| per layer)."""

    model: onnx.ModelProto
    layers: int
    tiles: int
    shift_before: float
    seconds: float


def renormalise(backbone: Path, x: np.ndarray, source: LayerStats, blend: float,
                deadline: float) -> Renormalised:
    """``backbone`` with each layer's statistics on ``x`` blended towards ``source``'s.

    ``x`` is normalised network input from the target domain; ``blend`` is the weight of
    the target statistics (0: unchanged, 1: AdaBN's full reset). Stops correcting at
    ``deadline`` (``time.monotonic``): layers not reached keep their source weights.
    """
    started = time.monotonic()
    original = onnx.load(str(backbone))
    probe = LayerProbe(original)
    if probe.names != source.names:
        raise RenormError("layer statistics do not match the backbone's Conv layers "
                          f"({len(source.names)} vs {len(probe.names)}): re-export the bundle")
    moved: list[float] = []
    for k, node in enumerate(probe.layers):
        if time.monotonic() > deadline:
            break
        (mean_t, var_t), = probe.stats(x, [node.output[0]])
        mean_s, var_s = source.mean[k], source.var[k]
        moved.append(float(np.mean(np.abs(0.5 * np.log((var_t + 1e-8) / (var_s + 1e-8))))))
        mean_b = (1 - blend) * mean_s + blend * mean_t
        var_b = (1 - blend) * var_s + blend * var_t
        gain = np.sqrt(var_s / np.maximum(var_b, 1e-12))
        gain = np.where(var_s > 1e-12, gain, 1.0)  # dead channels stay as they are
        weight, bias = node.input[1], node.input[2]
        shape = (-1,) + (1,) * (probe.weights[weight].ndim - 1)
        probe.weights[weight] = (probe.weights[weight] * gain.reshape(shape)).astype(np.float32)
        probe.weights[bias] = (probe.weights[bias] * gain + mean_s - gain * mean_b
                               ).astype(np.float32)
    out = onnx.ModelProto()
    out.CopyFrom(original)
    _set_weights(out, probe)
    return Renormalised(out, len(moved), len(x), float(np.mean(moved)) if moved else 0.0,
                        time.monotonic() - started)


def _set_weights(model: onnx.ModelProto, probe: LayerProbe) -> None:
    """Write the probe's corrected weights into ``model`` (adding biases it lacked)."""
    inits = {i.name: i for i in model.graph.initializer}
    for node, probed in zip(conv_layers(model), probe.layers, strict=True):
        weight, bias = probed.input[1], probed.input[2]
        inits[weight].CopyFrom(numpy_helper.from_array(probe.weights[weight], weight))
        if bias in inits:
            inits[bias].CopyFrom(numpy_helper.from_array(probe.weights[bias], bias))
        else:
            model.graph.initializer.append(numpy_helper.from_array(probe.weights[bias], bias))
            if len(node.input) < 3:
                node.input.append(bias)
            else:
                node.input[2] = bias
