"""A scene read remotely, in windows, from a real nginx: the same result as the local file,
every request a byte range, and nothing but the GeoTIFF driver ever opens the object."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.config import Settings
from appliance.contract.bundle import load_bundle
from appliance.model.runtime import ModelRuntime, ProviderPlan
from appliance.scene.pipeline import SceneError, process_scene
from appliance.scene.source import RemoteAccess, SceneSource
from tests.helpers.range_server import RangeServer, write_cog
from tests.helpers.scenes import quarters, write_scene

SETTINGS = Settings.model_validate({"model": {"providers": ["cpu"]},
                                    "tiling": {"scales": [16, 32], "batch_size": 16}})


@pytest.fixture(scope="module")
def runtime(colour_bundle: Path) -> ModelRuntime:
    return ModelRuntime(load_bundle(colour_bundle), ProviderPlan(providers=("cpu",)))


@pytest.fixture()
def served(tmp_path: Path) -> Iterator[tuple[RangeServer, Path]]:
    folder = tmp_path / "www"
    folder.mkdir()
    plain = write_scene(tmp_path / "q.tif", size=(256, 256), layout=quarters(256, 256))
    write_cog(plain, folder / "q.tif")
    (folder / "ref.tif").write_text(  # a VRT under a .tif name: a reference, not pixels
        '<VRTDataset rasterXSize="8" rasterYSize="8"><VRTRasterBand dataType="Byte" band="1">'
        '<SimpleSource><SourceFilename>/etc/hostname</SourceFilename></SimpleSource>'
        '</VRTRasterBand></VRTDataset>')
    with RangeServer(folder, tmp_path / "nginx") as server:
        yield server, folder


def test_a_remote_cog_gives_the_local_result_through_range_requests(
        served: tuple[RangeServer, Path], runtime: ModelRuntime, tmp_path: Path) -> None:
    server, folder = served
    remote = SceneSource("http", server.url("q.tif"), RemoteAccess(timeout=5))
    far = process_scene(remote, "ab" * 32, tmp_path / "far", runtime, SETTINGS)
    near = process_scene(folder / "q.tif", "cd" * 32, tmp_path / "near", runtime, SETTINGS)
    assert far.fractions == near.fractions and far.tiles == near.tiles
    assert far.source == "q.tif" and far.origin is not None
    assert far.origin.kind == "http" and far.origin.url == server.url("q.tif")
    gets = [h for h in server.hits() if h.path == "/q.tif" and h.method == "GET"]
    assert gets and all(h.range.startswith("bytes=") and h.status == 206 for h in gets)
    assert not [h for h in server.hits() if h.path != "/q.tif"]  # no .ovr, .msk, .aux.xml


def test_a_remote_reference_format_or_other_name_is_never_followed(
        served: tuple[RangeServer, Path], runtime: ModelRuntime, tmp_path: Path) -> None:
    server, _ = served
    vrt = SceneSource("http", server.url("ref.tif"), RemoteAccess(timeout=5))
    with pytest.raises(SceneError) as caught:
        process_scene(vrt, "ab" * 32, tmp_path / "vrt", runtime, SETTINGS)
    assert caught.value.reason == "unreadable"
    only_jp2 = SceneSource("http", server.url("q.tif"), RemoteAccess((".jp2",), timeout=5))
    with pytest.raises(SceneError):
        process_scene(only_jp2, "ab" * 32, tmp_path / "ext", runtime, SETTINGS)
    assert {h.path for h in server.hits()} == {"/ref.tif"}
