"""Hostile raster inputs for tests: VRT/WMS XML, a canary HTTP server that records requests,
a sparse GeoTIFF of enormous declared size, a tiny real filesystem (tmpfs) to fill up."""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import rasterio
from rasterio.transform import Affine
from rasterio.windows import Window

GEO = "<SRS>EPSG:32633</SRS><GeoTransform>500000, 10, 0, 5000000, 0, -10</GeoTransform>"


class Canary:
    """An HTTP server on 127.0.0.1 that answers 404 and records every request path."""

    def __init__(self) -> None:
        self.requests: list[str] = []
        canary = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                canary.requests.append(self.path)
                self.send_error(404)

            do_HEAD = do_GET

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Canary:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def vrt_xml(sources: Sequence[str], size: tuple[int, int] = (64, 64),
            relative: bool = False) -> str:
    """A 3-band Byte VRTDataset whose band i reads band 1..3 of ``sources[i]``."""
    h, w = size
    bands = "".join(
        f'<VRTRasterBand dataType="Byte" band="{i + 1}"><SimpleSource>'
        f'<SourceFilename relativeToVRT="{int(relative)}">{src}</SourceFilename>'
        f"<SourceBand>{i + 1}</SourceBand></SimpleSource></VRTRasterBand>"
        for i, src in enumerate(sources))
    return f'<VRTDataset rasterXSize="{w}" rasterYSize="{h}">{GEO}{bands}</VRTDataset>'


def wms_xml(url: str) -> str:
    """A GDAL_WMS service description pointing at ``url``."""
    return (f"<GDAL_WMS><Service name=\"TMS\"><ServerUrl>{url}/${{z}}/${{x}}/${{y}}.png"
            "</ServerUrl></Service><DataWindow><UpperLeftX>-20037508.34</UpperLeftX>"
            "<UpperLeftY>20037508.34</UpperLeftY><LowerRightX>20037508.34</LowerRightX>"
            "<LowerRightY>-20037508.34</LowerRightY><TileLevel>18</TileLevel>"
            "<TileCountX>1</TileCountX><TileCountY>1</TileCountY></DataWindow>"
            "<Projection>EPSG:3857</Projection><BlockSizeX>256</BlockSizeX>"
            "<BlockSizeY>256</BlockSizeY><BandsCount>3</BandsCount></GDAL_WMS>")


def write_sparse(path: Path, side: int) -> Path:
    """A ``side``² 3-band uint8 tiled GeoTIFF with one 256² tile written: a few MB on disk."""
    with rasterio.open(path, "w", driver="GTiff", width=side, height=side, count=3,
                       dtype="uint8", tiled=True, blockxsize=256, blockysize=256,
                       sparse_ok=True, bigtiff="YES", crs="EPSG:32633",
                       transform=Affine(10, 0, 500000, 0, -10, 5000000)) as dst:
        dst.write(np.full((3, 256, 256), 7, np.uint8), window=Window(0, 0, 256, 256))
    return path


@contextmanager
def tmpfs(mountpoint: Path, size: str) -> Iterator[Path | None]:
    """A tmpfs of ``size`` mounted at ``mountpoint`` (None where mounting is not allowed)."""
    mountpoint.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                           str(mountpoint)], capture_output=True, check=False)
    if done.returncode != 0:
        yield None
        return
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", str(mountpoint)], check=False)


def fill(disk: Path, leave: int = 4096) -> Path:
    """Fill the filesystem of ``disk`` with one file, then free ``leave`` bytes of it."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass
    os.truncate(filler, filler.stat().st_size - leave)
    return filler
