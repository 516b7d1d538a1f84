"""Runtime: real onnxruntime on a real bundle; a missing GPU provider falls back loudly."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from appliance.config import Settings
from appliance.contract.bundle import load_bundle
from appliance.model.runtime import (
    SPINNING,
    ModelRuntime,
    ProviderPlan,
    open_session,
    probabilities,
)
from tests.helpers.paths import REPO

ROOT = REPO


def _painted(colours: list[tuple[int, int, int]], size: int = 32) -> np.ndarray:
    tiles = np.zeros((len(colours), 3, size, size), np.float32)
    for i, c in enumerate(colours):
        tiles[i] = np.asarray(c, np.float32).reshape(3, 1, 1)
    return tiles


def test_infer_classifies_colours_and_normalises_embeddings(colour_bundle: Path) -> None:
    runtime = ModelRuntime(load_bundle(colour_bundle), ProviderPlan(providers=("cpu",)))
    runtime.warmup()
    out = runtime.infer(_painted([(210, 20, 20), (20, 210, 20), (20, 20, 210)]))
    assert out.probs.argmax(axis=1).tolist() == [0, 1, 2]
    np.testing.assert_allclose(out.probs.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(out.embedding, axis=1), 1.0, rtol=1e-5)
    assert out.features.shape == (3, runtime.manifest.feature_dim)
    assert runtime.providers == ["CPUExecutionProvider"]


def test_gpu_request_without_gpu_falls_back_loudly(
    colour_bundle: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        try:
            probe = ModelRuntime(load_bundle(colour_bundle), ProviderPlan(providers=("cuda",)))
        except Exception:  # pragma: no cover - a broken CUDA install is also "no GPU"
            probe = None
        if probe is not None and probe.providers[0] == "CUDAExecutionProvider":
            pytest.skip("a working CUDA provider is present; the fallback cannot be observed")
    with caplog.at_level(logging.WARNING, logger="appliance.model.runtime"):
        runtime = ModelRuntime(load_bundle(colour_bundle), ProviderPlan(providers=("cuda", "cpu")))
    assert runtime.providers[0] == "CPUExecutionProvider"
    assert any("CUDAExecutionProvider" in r.getMessage() for r in caplog.records)
    # Heads are narrowed to what the backbone got: the warning is not repeated per head.
    assert runtime.plan.providers == ("cpu",)


def test_tensorrt_plan_carries_engine_cache_options(tmp_path: Path) -> None:
    plan = ProviderPlan(providers=("tensorrt", "cuda"), trt_cache=tmp_path / "trt")
    first, second, last = plan.ort_providers()
    assert isinstance(first, tuple) and first[0] == "TensorrtExecutionProvider"
    assert first[1]["trt_engine_cache_enable"] is True
    assert first[1]["trt_engine_cache_path"] == str(tmp_path / "trt")
    # TF32 off unless asked: features stay comparable with the CPU-made reference.
    assert second == ("CUDAExecutionProvider", {"use_tf32": 0})
    assert last == "CPUExecutionProvider"
    fast = ProviderPlan.from_settings(Settings.model_validate(
        {"model": {"providers": ["cuda"], "cuda_tf32": True}}))
    assert fast.ort_providers()[0] == ("CUDAExecutionProvider", {"use_tf32": 1})


def test_activation_functions() -> None:
    logits = np.array([[0.0, 0.0], [10.0, -10.0]], np.float32)
    np.testing.assert_allclose(probabilities(logits, False)[0], [0.5, 0.5])
    np.testing.assert_allclose(probabilities(logits, True)[1], [1.0, 0.0], atol=1e-4)


def test_sessions_do_not_spin_between_runs(colour_bundle: Path) -> None:
    # Three sessions run back to back per batch; spinning pools would fight over the cores.
    session = open_session(colour_bundle / "backbone.onnx", ProviderPlan(providers=("cpu",)))
    assert session.get_session_options().get_session_config_entry(SPINNING) == "0"


def _pip_cublas() -> str | None:
    """The cuBLASLt library of pip's nvidia wheels matching this onnxruntime's CUDA, if any."""
    import importlib.util

    from onnxruntime.capi import build_and_package_info

    cuda = getattr(build_and_package_info, "cuda_version", "")
    spec = importlib.util.find_spec("nvidia")
    if not cuda or spec is None or not spec.submodule_search_locations:
        return None
    name = f"libcublasLt.so.{cuda.split('.')[0]}"
    found = any(any(Path(root).rglob(name)) for root in spec.submodule_search_locations)
    return name if found else None


def test_gpu_plan_loads_cuda_libraries_from_pip_wheels(colour_bundle: Path) -> None:
    """Without this, onnxruntime-gpu with pip's CUDA fails "libcublasLt.so.13: cannot open
    shared object file" and the node runs on CPU. A fresh process, so nothing else
    (torch, an earlier test) has loaded the library already."""
    lib = _pip_cublas()
    if lib is None or not Path("/proc/self/maps").is_file():
        pytest.skip("no onnxruntime CUDA build with pip nvidia-* CUDA wheels here")
    code = (
        "from pathlib import Path\n"
        "from appliance.contract.bundle import load_bundle\n"
        "from appliance.model.runtime import ModelRuntime, ProviderPlan\n"
        f"bundle = load_bundle(Path({str(colour_bundle)!r}))\n"
        "ModelRuntime(bundle, ProviderPlan(providers=('cuda',)))\n"
        f"print('mapped' if {lib!r} in Path('/proc/self/maps').read_text() else 'missing')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, check=True)
    assert out.stdout.split()[-1] == "mapped", out.stdout + out.stderr


def test_io_binding_gives_the_outputs_of_plain_runs(colour_bundle: Path) -> None:
    bundle = load_bundle(colour_bundle)
    plain = ModelRuntime(bundle, ProviderPlan(providers=("cpu",)))
    bound = ModelRuntime(bundle, ProviderPlan(providers=("cpu",), io_binding=True))
    assert not plain.binds and bound.binds and bound.device == "cpu"  # auto: off on a CPU
    tiles = np.random.default_rng(0).uniform(0, 255, (5, 3, 32, 32)).astype(np.float32)
    a, b = plain.infer(tiles), bound.infer(tiles)
    for name in ("features", "probs", "embedding"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert Settings().model.io_binding is None
