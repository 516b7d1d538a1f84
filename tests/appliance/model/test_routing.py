"""Routing scenes to a bundle's experts by radiometry, through the real pipeline."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import rasterio

from appliance.config import Settings
from appliance.contract.bundle import CLASSIFIER, BundleError, Expert, load_bundle, seal_bundle
from appliance.contract.signature import (
    Signature,
    band_moments,
    radiometric_distance,
    scene_signature,
    sharpness,
)
from appliance.model.routing import nearest, route, source_margin
from appliance.model.runtime import ModelRuntime, ProviderPlan
from appliance.scene.pipeline import process_scene
from tests.helpers.scenes import quarters, write_scene

DARK = 0.6  # the other sensor: every band at 60 % of the source's gain
SETTINGS = Settings.model_validate({"model": {"providers": ["cpu"]},
                                    "tiling": {"scales": [16, 32], "batch_size": 16}})


def test_radiometric_distance_counts_offsets_in_sigma_and_gains_as_log_ratios() -> None:
    mean, std = np.array([100.0, 50.0]), np.array([20.0, 10.0])
    sharp = np.array([0.3, 0.2])
    assert radiometric_distance((mean, std, None), (mean, std, None)) == 0.0
    assert radiometric_distance((mean + std, std, None), (mean, std, None)) == pytest.approx(1.0)
    assert radiometric_distance((mean, 2 * std, None), (mean, std, None)) == pytest.approx(
        np.log(2))
    # Sharpness counts only when both sides measured it.
    assert radiometric_distance((mean, std, sharp / 2), (mean, std, sharp)) == pytest.approx(
        np.log(2))
    assert radiometric_distance((mean, std, sharp / 2), (mean, std, None)) == 0.0


def test_sharpness_ignores_gains_and_offsets_and_falls_with_blur() -> None:
    rng = np.random.default_rng(0)
    tiles = rng.uniform(0, 255, (4, 3, 32, 32))
    sharp = sharpness(tiles)
    np.testing.assert_allclose(sharpness(0.5 * tiles + 40), sharp, rtol=1e-9)
    blurred = (tiles + np.roll(tiles, 1, axis=3) + np.roll(tiles, 1, axis=2)
               + np.roll(tiles, (1, 1), axis=(2, 3))) / 4
    assert (sharpness(blurred) < 0.8 * sharp).all()


def test_nearest_prefers_the_source_on_a_tie() -> None:
    assert nearest({None: 0.3, "dark": 0.3}) is None
    assert nearest({None: 0.3, "dark": 0.2}) == "dark"


def test_an_experts_margin_keeps_the_source_scenes_it_was_calibrated_on() -> None:
    source: Signature = (np.array([100.0]), np.array([20.0]), None)
    hazy: Signature = (np.array([130.0]), np.array([15.0]), None)
    bright_source_scene: Signature = (np.array([118.0]), np.array([17.0]), None)
    plain = {None: radiometric_distance(bright_source_scene, source),
             "hazy": radiometric_distance(bright_source_scene, hazy)}
    assert nearest(plain) == "hazy"  # without a margin the expert takes it
    samples = [source] * 9 + [bright_source_scene]
    margin = source_margin(samples, source, hazy, allowance=0.0)
    assert margin == pytest.approx(plain[None] - plain["hazy"])
    assert nearest({**plain, "hazy": plain["hazy"] + margin}) is None
    far = (np.array([135.0]), np.array([14.0]), None)  # a scene that stands clear still goes
    assert nearest({None: radiometric_distance(far, source),
                    "hazy": radiometric_distance(far, hazy) + margin}) == "hazy"
    # allowed one sample in ten, the expert may keep the bright one: no margin is needed
    assert source_margin(samples, source, hazy, allowance=0.1) == 0.0
    assert source_margin([source], source, hazy, allowance=0.0) == pytest.approx(0.0, abs=1e-6)


def _scene(path: Path, gain: float = 1.0) -> Path:
    return write_scene(path, size=(128, 128), layout=quarters(128, 128), noise=12, gain=gain)


def _pixels(path: Path) -> np.ndarray:
    with rasterio.open(path) as ds:
        return ds.read().reshape(ds.count, -1).T.astype(np.float32)


@pytest.fixture()
def dark_bundle(colour_bundle: Path, tmp_path: Path) -> Path:
    """The colour bundle plus an expert for the dark sensor: its input spec undoes the gain."""
    out = tmp_path / "bundle"
    shutil.copytree(colour_bundle, out)
    source = load_bundle(out).manifest
    mean, std = band_moments(_pixels(_scene(tmp_path / "dark-ref.tif", DARK)))
    spec = source.input.model_copy(update={"mean": [m * DARK for m in source.input.mean],
                                           "std": [s * DARK for s in source.input.std]})
    shutil.copyfile(out / CLASSIFIER, out / "classifier.dark.onnx")
    domain = Expert(name="dark", mean=mean.tolist(), std=std.tolist(), input=spec,
                    classifier="classifier.dark.onnx")
    seal_bundle(out, source.model_copy(update={
        "version": 2, "experts": [domain],
        "files": {**source.files, domain.classifier: ""}}))
    return out


def test_pipeline_routes_each_scene_to_the_expert_of_its_sensor(
        colour_bundle: Path, dark_bundle: Path, tmp_path: Path) -> None:
    runtime = ModelRuntime(load_bundle(dark_bundle), ProviderPlan(providers=("cpu",)))
    clean = process_scene(_scene(tmp_path / "clean.tif"), "aa" * 32, tmp_path / "c", runtime,
                          SETTINGS)
    dark = process_scene(_scene(tmp_path / "dark.tif", DARK), "bb" * 32, tmp_path / "d",
                         runtime, SETTINGS)
    assert clean.cells.domain is None and dark.cells.domain == "dark"
    summary = json.loads(Path(dark.outputs["summary"]).read_text())
    assert summary["model"] == {"name": "colour-test", "version": 2, "domain": "dark"}
    # The expert's input spec undoes the gain: the dark scene reads like the clean one.
    np.testing.assert_array_equal(dark.cells.labels, clean.cells.labels)
    assert np.abs(dark.cells.probs - clean.cells.probs).max() < 0.05
    # The source path is the plain bundle's, unchanged by the expert beside it.
    plain = ModelRuntime(load_bundle(colour_bundle), ProviderPlan(providers=("cpu",)))
    alone = process_scene(tmp_path / "clean.tif", "aa" * 32, tmp_path / "p", plain, SETTINGS)
    np.testing.assert_array_equal(alone.cells.probs, clean.cells.probs)
    assert route(runtime.bundle, scene_signature(_pixels(tmp_path / "dark.tif"))) == "dark"


def test_adopt_swaps_experts_without_a_new_backbone(colour_bundle: Path, dark_bundle: Path
                                                   ) -> None:
    runtime = ModelRuntime(load_bundle(colour_bundle), ProviderPlan(providers=("cpu",)))
    backbone = runtime._backbone
    assert runtime.adopt(load_bundle(dark_bundle))
    assert runtime._backbone is backbone and runtime.manifest.version == 2
    tiles = np.full((2, 3, 32, 32), 60.0, np.float32)
    assert runtime.infer(tiles, "dark").probs.shape == (2, 3)
    with pytest.raises(BundleError, match="no domain 'bright'"):
        runtime.infer(tiles, "bright")


def test_a_domain_head_must_be_sealed(dark_bundle: Path) -> None:
    manifest = json.loads((dark_bundle / "manifest.json").read_text())
    del manifest["files"]["classifier.dark.onnx"]
    (dark_bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"domain 'dark' file classifier\.dark\.onnx"):
        load_bundle(dark_bundle)


def _blurred(src: Path, dst: Path) -> Path:
    """``src`` through a 5×5 box filter: the same band moments, far less sharpness."""
    with rasterio.open(src) as ds:
        data = ds.read().astype(np.float64)
        profile = ds.profile
    padded = np.pad(data, ((0, 0), (2, 2), (2, 2)), mode="edge")
    out = sum(padded[:, i:i + data.shape[1], j:j + data.shape[2]]
              for i in range(5) for j in range(5)) / 25
    with rasterio.open(dst, "w", **profile) as ds:
        ds.write(np.rint(out).astype(profile["dtype"]))
    return dst


def test_sharpness_routes_a_blurred_sensor_that_band_moments_cannot_tell_apart(
        colour_bundle: Path, tmp_path: Path) -> None:
    """A coarser sensor keeps band moments: only the sharpness term separates it."""
    clean = write_scene(tmp_path / "clean.tif", size=(128, 128), layout=quarters(128, 128),
                        noise=40)
    soft = _blurred(clean, tmp_path / "soft.tif")
    runtime = ModelRuntime(load_bundle(colour_bundle), ProviderPlan(providers=("cpu",)))
    probes = {}
    for name, path in (("clean", clean), ("soft", soft)):
        outcome = process_scene(path, name * 32, tmp_path / name, runtime, SETTINGS,
                                probe_sharpness=True)
        probes[name] = outcome.cells
    clean_sharp, soft_sharp = probes["clean"].sharpness, probes["soft"].sharpness
    assert clean_sharp is not None and soft_sharp is not None
    assert (soft_sharp < 0.7 * clean_sharp).all()
    # A bundle whose reference knows the source sharpness, with an expert for the soft sensor
    # whose band moments are the source's own: only sharpness can route.
    out = tmp_path / "bundle"
    shutil.copytree(colour_bundle, out)
    manifest = load_bundle(out).manifest
    reference = json.loads((out / "reference.json").read_text())
    for band, value in zip(reference["bands"], clean_sharp, strict=True):
        band["sharpness"] = float(value)
    (out / "reference.json").write_text(json.dumps(reference))
    shutil.copyfile(out / CLASSIFIER, out / "classifier.soft.onnx")
    source_bands = load_bundle(colour_bundle).reference.bands
    domain = Expert(name="soft", mean=[b.mean for b in source_bands],
                    std=[b.std for b in source_bands], sharpness=soft_sharp.tolist(),
                    input=manifest.input, classifier="classifier.soft.onnx")
    seal_bundle(out, manifest.model_copy(update={
        "version": 2, "experts": [domain], "files": {**manifest.files, domain.classifier: ""}}))
    routed = ModelRuntime(load_bundle(out), ProviderPlan(providers=("cpu",)))
    for name, path, expert in (("clean", clean, None), ("soft", soft, "soft")):
        outcome = process_scene(path, name * 32, tmp_path / f"r-{name}", routed, SETTINGS)
        assert outcome.cells.domain == expert, name


def test_experts_opened_ahead_are_the_ones_adopted(colour_bundle: Path, dark_bundle: Path
                                                   ) -> None:
    """The daemon opens (and warms) a new version's sessions on the adaptation thread; the
    main loop's swap then uses exactly those, opening nothing."""
    runtime = ModelRuntime(load_bundle(colour_bundle), ProviderPlan(providers=("cpu",)))
    dark = load_bundle(dark_bundle)
    ahead = runtime.open_experts(dark, warmup_batch=2)
    assert set(ahead) == {None, "dark"}
    assert runtime.adopt(dark, ahead)
    assert runtime._experts is ahead
    # Sessions prepared for another bundle are not trusted: the runtime opens its own.
    plain = load_bundle(colour_bundle)
    assert runtime.adopt(plain, ahead)
    assert set(runtime._experts) == {None}
