"""Class colours: a semantic default palette, and palette files that override it.

Maps are read by people: water should be blue, forest dark green, built-up areas red or
grey. ``semantic_palette`` gives each class the colour of the land-use family its name
belongs to (keywords in CamelCase or run-together names such as AID's ``DenseResidential``
or UC Merced's ``parkinglot``), varied within a family so neighbouring classes stay
apart. No class is ever near white or black, which read as holes or nodata. A palette
file (``terratile-export bundle --palette FILE``) maps class names to ``#rrggbb`` or
``[r, g, b]``; classes it leaves out keep their semantic colour.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict


class ClassSpec(BaseModel):
    """One output class and the colour it gets in maps and legends."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    colour: tuple[int, int, int]

    @property
    def hex(self) -> str:
        return "#{:02x}{:02x}{:02x}".format(*self.colour)

    @property
    def description(self) -> str:
        """The name in words: ``DenseResidential`` → ``Dense residential``."""
        words = re.sub(r"(?<=[a-z])(?=[A-Z])|[_-]+", " ", self.name).split()
        text = " ".join(words).lower()
        return text[:1].upper() + text[1:] if text else self.name


# Families in priority order (the first whose keyword occurs in the name wins: "parking"
# is transport before "park" is vegetation), each with colours for its members.
FAMILIES: list[tuple[tuple[str, ...], list[tuple[int, int, int]]]] = [
    (("baseball", "tennis", "playground", "stadium", "golf", "sport", "court", "pitch"),
     [(118, 186, 153), (86, 160, 130), (150, 205, 175), (70, 140, 115)]),
    (("airport", "airplane", "runway", "railway", "rail", "road", "highway", "freeway",
      "parking", "bridge", "viaduct", "harbor", "harbour", "port", "intersection",
      "overpass", "station"),
     [(128, 128, 128), (96, 96, 112), (160, 160, 150), (112, 120, 140), (80, 88, 96),
      (176, 170, 180), (140, 130, 120), (100, 110, 125)]),
    (("residential", "house", "home", "building", "urban", "settlement"),
     [(200, 40, 40), (225, 100, 85), (240, 155, 135), (170, 55, 70)]),
    (("commercial", "center", "centre", "industrial", "school", "church", "resort",
      "square", "storage", "tank", "factory", "built"),
     [(165, 70, 110), (120, 80, 130), (190, 110, 150), (140, 60, 60), (150, 120, 150),
      (205, 135, 110), (110, 60, 90), (180, 90, 90)]),
    (("river", "lake", "pond", "sea", "ocean", "water", "reservoir", "wetland", "canal"),
     [(30, 100, 200), (70, 150, 220), (25, 70, 160), (110, 180, 230)]),
    (("forest", "wood", "tree"),
     [(30, 110, 50), (45, 130, 70), (25, 90, 40)]),
    (("meadow", "grass", "park", "farmland", "farm", "field", "crop", "agricultur",
      "pasture", "orchard", "chaparral", "vegetation", "garden", "shrub"),
     [(120, 190, 80), (170, 210, 100), (90, 160, 60), (200, 215, 120), (140, 175, 70)]),
    (("beach", "sand", "desert", "bare", "barren", "dune", "soil"),
     [(230, 205, 140), (205, 170, 110), (220, 185, 160), (185, 150, 95)]),
    (("mountain", "rock", "cliff", "hill", "snow", "ice"),
     [(140, 115, 95), (165, 150, 130), (120, 100, 80)]),
]
OTHER = [(200, 150, 40), (60, 160, 170), (150, 100, 200), (210, 120, 40), (90, 130, 60),
         (180, 80, 160), (70, 110, 180), (160, 140, 60)]


def _family(name: str) -> int:
    key = re.sub(r"[^a-z]", "", name.lower())
    for i, (keywords, _) in enumerate(FAMILIES):
        if any(k in key for k in keywords):
            return i
    return len(FAMILIES)


def _safe(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    """Kept away from white and black: every channel within 25..235, not all above 220."""
    r, g, b = (min(235, max(25, int(v))) for v in rgb)
    if min(r, g, b) > 220:
        r, g, b = r - 30, g - 30, b - 30
    return r, g, b


def semantic_palette(names: list[str]) -> list[ClassSpec]:
    """Every class coloured by its land-use family, distinct within a family (a family
    with more members than colours repeats them darkened)."""
    used: dict[int, int] = {}
    specs = []
    for name in names:
        fam = _family(name)
        colours = FAMILIES[fam][1] if fam < len(FAMILIES) else OTHER
        k = used.get(fam, 0)
        used[fam] = k + 1
        r, g, b = colours[k % len(colours)]
        f = 0.8 ** (k // len(colours))
        specs.append(ClassSpec(name=name, colour=_safe((round(r * f), round(g * f),
                                                         round(b * f)))))
    return specs


class PaletteError(ValueError):
    """A palette file that cannot be used; the message names the class or value."""


def _colour(name: str, value: Any) -> tuple[int, int, int]:
    if isinstance(value, str) and re.fullmatch(r"#?[0-9A-Fa-f]{6}", value.strip()):
        h = value.strip().lstrip("#")
        return int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16)
    if (isinstance(value, list) and len(value) == 3
            and all(isinstance(v, int) and 0 <= v <= 255 for v in value)):
        return int(value[0]), int(value[1]), int(value[2])
    raise PaletteError(f"class {name!r}: colour {value!r} is neither #rrggbb nor [r, g, b]")


def read_palette(path: Path, names: list[str]) -> list[ClassSpec]:
    """The classes ``names`` coloured by the palette file at ``path`` (JSON or YAML mapping
    class name → colour), the semantic palette for classes it leaves out."""
    try:
        text = Path(path).read_text()
        doc = json.loads(text) if Path(path).suffix == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise PaletteError(f"{path}: unreadable palette: {exc}") from exc
    if not isinstance(doc, dict):
        raise PaletteError(f"{path}: a palette is a mapping of class name to colour")
    unknown = sorted(set(map(str, doc)) - set(names))
    if unknown:
        raise PaletteError(f"{path}: classes {unknown} are not in the model "
                           f"({', '.join(names)})")
    return [ClassSpec(name=c.name, colour=_colour(c.name, doc[c.name])) if c.name in doc
            else c for c in semantic_palette(names)]
