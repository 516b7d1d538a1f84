"""The one list of chip suffixes, upper case too; other image formats are not chips (that
every suffix opens with the one chip reader: test_chips.py)."""

from __future__ import annotations

from pathlib import Path

from appliance.contract.image_files import IMAGE_SUFFIXES, RASTER_SUFFIXES, is_image, is_raster


def test_suffixes_are_case_insensitive_and_nothing_else_is_a_chip() -> None:
    assert RASTER_SUFFIXES < IMAGE_SUFFIXES
    for name in ("a.tif", "a.TIFF", "b.Jpg", "c.jpeg", "d.PNG"):
        assert is_image(Path(name)), name
    assert is_raster(Path("x.TIF")) and not is_raster(Path("x.png"))
    for name in ("a.jp2", "a.bmp", "a.gif", "a.txt", "tif", "a.tif.bak"):
        assert not is_image(Path(name)), name
