"""The semantic palette and palette files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from appliance.contract.palette import PaletteError, read_palette, semantic_palette

AID = ["Airport", "BareLand", "BaseballField", "Beach", "Bridge", "Center", "Church",
       "Commercial", "DenseResidential", "Desert", "Farmland", "Forest", "Industrial",
       "Meadow", "MediumResidential", "Mountain", "Park", "Parking", "Playground", "Pond",
       "Port", "RailwayStation", "Resort", "River", "School", "SparseResidential", "Square",
       "Stadium", "StorageTanks", "Viaduct"]


def _hue(rgb: tuple[int, int, int]) -> str:
    r, g, b = rgb
    if b > r + 40 and b > g:
        return "blue"
    if g > r and g > b:
        return "green"
    if r > g + 40 and r > b + 40:
        return "red"
    return "other"


def test_aid_classes_get_colours_by_meaning() -> None:
    colours = {c.name: c.colour for c in semantic_palette(AID)}
    assert all(_hue(colours[n]) == "blue" for n in ("River", "Pond"))
    assert all(_hue(colours[n]) == "green" for n in ("Forest", "Meadow", "Park", "Farmland"))
    assert all(_hue(colours[n]) == "red" for n in ("DenseResidential", "MediumResidential"))
    assert len(set(colours.values())) == len(AID)  # all distinct
    for rgb in colours.values():  # never white or black
        assert min(rgb) >= 25 and max(rgb) <= 235 and not min(rgb) > 220


def test_run_together_names_are_understood() -> None:
    colours = {c.name: c.colour for c in semantic_palette(["parkinglot", "mobilehomepark",
                                                          "golfcourse", "river"])}
    assert _hue(colours["parkinglot"]) == "other"  # grey transport, not park green
    assert _hue(colours["mobilehomepark"]) == "red"
    assert _hue(colours["river"]) == "blue"


def test_palette_file_overrides_some_classes(tmp_path: Path) -> None:
    path = tmp_path / "palette.json"
    path.write_text(json.dumps({"Forest": "#004400", "River": [0, 0, 255]}))
    specs = {c.name: c.colour for c in read_palette(path, AID)}
    assert specs["Forest"] == (0, 68, 0) and specs["River"] == (0, 0, 255)
    assert specs["Meadow"] == {c.name: c.colour for c in semantic_palette(AID)}["Meadow"]
    path.write_text(json.dumps({"Lava": "#ff0000"}))
    with pytest.raises(PaletteError, match="Lava"):
        read_palette(path, AID)
    path.write_text(json.dumps({"Forest": "green"}))
    with pytest.raises(PaletteError, match="Forest"):
        read_palette(path, AID)
