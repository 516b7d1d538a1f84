"""read_tile: an image file as the model sees it. Default-config queries embed exactly what
they did before the chip reader moved to the contract; ``input.rescale`` and ``input.bands``
apply to a chip as they do to a scene."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
from PIL import Image
from rasterio.enums import Resampling
from rasterio.transform import from_origin

from appliance.config import InputConfig, RetrievalConfig
from appliance.contract.bundle import InputSpec, load_bundle
from appliance.contract.image_files import is_raster
from appliance.model.runtime import ModelRuntime, ProviderPlan
from appliance.retrieval.image import read_tile
from appliance.retrieval.index import TileIndex
from appliance.retrieval.query import RequestError
from appliance.retrieval.service import RetrievalService
from appliance.scene.raster import open_scene
from tests.helpers.chips import ALL_SUFFIXES, write_chip
from tests.helpers.colour_bundle import EMBED_DIM, INPUT_SIZE, PURE
from tests.helpers.hostile import Canary, vrt_xml
from tests.helpers.scenes import quarters, write_scene


@pytest.fixture(scope="module")
def runtime(colour_bundle: Path) -> ModelRuntime:
    return ModelRuntime(load_bundle(colour_bundle), ProviderPlan(providers=("cpu",)))


def textured(path: Path, dtype: str = "uint8", bands: int = 3, seed: int = 0) -> Path:
    """A 50x70 chip of smooth random texture (so resampling matters), of any dtype."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(0, 1, (bands, 5, 7)).repeat(10, axis=1).repeat(10, axis=2)
    values = base + rng.uniform(0, 0.2, base.shape)
    if path.suffix in (".jpg", ".png"):
        Image.fromarray((values[:3] * 200).astype(np.uint8).transpose(1, 2, 0)).save(path)
        return path
    scale = 200 if dtype == "uint8" else 3000
    with rasterio.open(path, "w", driver="GTiff", width=70, height=50, count=bands,
                       dtype=dtype, crs="EPSG:32633",
                       transform=from_origin(500000, 4000000, 10, 10)) as dst:
        dst.write((values * scale).astype(dtype))
    return path


def before(path: Path, spec: InputSpec) -> np.ndarray:
    """What image queries read before this refactor (the former ``load_image``), kept as
    the reference: bilinear read at the input size, 8-bit values mapped linearly onto the
    value range, anything else stretched 2–98 % per band in float64."""
    size, n = spec.size, len(spec.bands)
    if is_raster(path):
        with rasterio.open(path) as src:
            data = src.read(list(range(1, n + 1)), out_shape=(n, size, size),
                            resampling=Resampling.bilinear)
    else:
        with Image.open(path) as img:
            pic = img.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
            data = np.asarray(pic).transpose(2, 0, 1)
    lo, hi = spec.value_range
    if data.dtype == np.uint8:
        return data.astype(np.float32) * np.float32((hi - lo) / 255.0) + np.float32(lo)
    p2, p98 = np.percentile(data.reshape(n, -1).astype(np.float64), [2, 98], axis=1)
    scale = (hi - lo) / np.maximum(p98 - p2, 1e-9)
    return ((data - p2[:, None, None]) * scale[:, None, None] + lo).clip(lo, hi).astype(
        np.float32)


@pytest.mark.parametrize("name", ["q.jpg", "q.png", "q.tif"])
def test_a_default_config_query_embeds_exactly_as_before(name: str, tmp_path: Path,
                                                         runtime: ModelRuntime) -> None:
    path = textured(tmp_path / name)
    spec = runtime.manifest.input
    tile = read_tile(path, spec, InputConfig())
    assert tile.dtype == np.float32 and tile.shape == (3, INPUT_SIZE, INPUT_SIZE)
    assert np.array_equal(tile, before(path, spec))
    index = TileIndex(tmp_path / "state", RetrievalConfig(), EMBED_DIM, read_only=True)
    service = RetrievalService(index, RetrievalConfig(), lambda: runtime, "n", InputConfig())
    expected = runtime.infer(before(path, spec)[None]).embedding[0]
    assert np.array_equal(service.embed_file(path), expected)


@pytest.mark.parametrize("dtype", ["uint16", "float32"])
def test_other_dtypes_keep_the_default_stretch_up_to_float32_rounding(
        dtype: str, tmp_path: Path, runtime: ModelRuntime) -> None:
    path = textured(tmp_path / "q.tif", dtype=dtype, bands=4)
    spec = runtime.manifest.input
    tile, old = read_tile(path, spec, InputConfig()), before(path, spec)
    assert tile.min() == 0 and tile.max() == 255  # still a 2–98 % stretch, clipped
    np.testing.assert_allclose(tile, old, rtol=0, atol=1e-4)


@pytest.mark.parametrize(("dtype", "rescale"), [
    ("uint16", {}),  # auto: percentile for a 16-bit chip
    ("uint16", {"mode": "linear", "factor": 0.05, "offset": 3.0}),
    ("uint8", {"mode": "percentile", "percentiles": [10, 90]}),
    ("uint8", {}),  # auto: values kept
])
def test_a_chip_is_rescaled_as_the_same_pixels_in_a_scene(
        dtype: str, rescale: dict[str, object], tmp_path: Path, runtime: ModelRuntime) -> None:
    """A chip the size of the model input reads exactly like that scene's one cell."""
    gain = 20.0 if dtype == "uint16" else 0.5
    path = write_scene(tmp_path / "chip.tif", dtype=dtype, size=(INPUT_SIZE, INPUT_SIZE),
                       layout=quarters(INPUT_SIZE, INPUT_SIZE), gain=gain, offset=40,
                       noise=6.0)
    cfg = InputConfig.model_validate({"rescale": rescale})
    spec = runtime.manifest.input
    with open_scene(path, cfg, spec) as scene:
        cell = scene.read_window(0, 0, INPUT_SIZE, INPUT_SIZE, INPUT_SIZE, INPUT_SIZE)
        mode = scene.rescale.mode
    assert mode == ("percentile" if dtype == "uint16" and not rescale
                    else rescale.get("mode", "none"))
    assert np.array_equal(read_tile(path, spec, cfg), cell)


def test_input_bands_choose_geotiff_bands(tmp_path: Path, runtime: ModelRuntime) -> None:
    path = write_scene(tmp_path / "bgr.tif", bands=4, size=(40, 40), band_order=(2, 1, 0),
                       layout=lambda r, c: np.full((r.shape[0], c.shape[1]), "urban"))
    spec = runtime.manifest.input
    as_rgb = read_tile(path, spec, InputConfig(bands=[3, 2, 1]))
    assert as_rgb[:, 0, 0].tolist() == list(PURE["urban"])
    assert read_tile(path, spec, InputConfig())[:, 0, 0].tolist() == list(PURE["urban"][::-1])
    with pytest.raises(RequestError, match=r"input\.bands lists 2 bands") as wrong:
        read_tile(path, spec, InputConfig(bands=[1, 2]))
    assert wrong.value.code == "bands"
    with pytest.raises(RequestError, match="cannot read bands") as missing:
        read_tile(path, spec, InputConfig(bands=[1, 2, 9]))
    assert missing.value.code == "bands"


def test_unreadable_and_non_finite_chips_are_bad_images(tmp_path: Path,
                                                        runtime: ModelRuntime) -> None:
    spec = runtime.manifest.input
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG broken")
    nan = write_scene(tmp_path / "nan.tif", dtype="float32", size=(8, 8), nodata=np.nan,
                      border=1)
    for path, message in [(broken, "unreadable image"), (nan, "NaN or infinite")]:
        with pytest.raises(RequestError, match=message) as err:
            read_tile(path, spec, InputConfig())
        assert err.value.code == "bad-image"


@pytest.mark.parametrize("suffix", ALL_SUFFIXES)
def test_every_suffix_is_classified_by_its_colour(suffix: str, tmp_path: Path,
                                                 runtime: ModelRuntime) -> None:
    tile = read_tile(write_chip(tmp_path / f"chip{suffix}", PURE["water"]),
                     runtime.manifest.input, InputConfig())
    probs = runtime.infer(tile[None]).probs[0]
    assert runtime.manifest.class_names[int(probs.argmax())] == "water"


def test_hostile_query_images_are_refused_with_their_reason_and_no_request(
    tmp_path: Path, runtime: ModelRuntime
) -> None:
    spec = runtime.manifest.input
    with Canary() as canary:
        vrt = tmp_path / "q.tif"
        vrt.write_text(vrt_xml([f"/vsicurl/{canary.url}/x.tif"] * 3))
        for conf in (InputConfig(), InputConfig(drivers=["GTiff", "VRT"])):
            with pytest.raises(RequestError, match="format") as err:
                read_tile(vrt, spec, conf)
            assert err.value.code == "format"
        assert canary.requests == []
    big = textured(tmp_path / "big.tif")
    with pytest.raises(RequestError, match="too-large") as err:
        read_tile(big, spec, InputConfig(max_pixels=70 * 50 - 1))
    assert err.value.code == "too-large"


def test_a_constant_band_query_maps_to_mid_range(tmp_path: Path,
                                                 runtime: ModelRuntime) -> None:
    path = write_scene(tmp_path / "c.tif", dtype="uint16", gain=40, size=(32, 32),
                       layout=lambda r, c: np.full(np.broadcast(r, c).shape, ""))
    tile = read_tile(path, runtime.manifest.input, InputConfig())
    lo, hi = runtime.manifest.input.value_range
    np.testing.assert_allclose(tile, (lo + hi) / 2)
