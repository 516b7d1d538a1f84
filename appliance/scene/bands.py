"""Bands by meaning: which scene bands feed the model's ``red``, ``green``, ``blue``, ``nir``…

The bundle names its input bands (``manifest.input.bands``). A scene says what its bands
are through their descriptions (``B04``, ``red``, ``SR_B5``…) and GDAL's colour
interpretation (set by a GeoTIFF's photometric tag or ``ExtraSamples``). With
``input.bands`` unset the box matches the two by name; when nothing names the bands it
takes them in order only if the scene has exactly as many as the model, because a
blue-green-red-NIR scene read as its first three bands looks plausible and is wrong. A
scene that cannot be matched fails with reason ``bands`` and a message saying what to set.

``input.bands`` overrides all of this: 1-based band numbers, names, or a mix, in the
model's band order. A number may repeat (``[1, 1, 1]`` runs an RGB model on a grey band).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from rasterio.enums import ColorInterp
from rasterio.io import DatasetReader

# Common band names (STAC eo:common_name) and the descriptions that mean them: STAC
# common names, Sentinel-2 (B02…) and Landsat 8/9 collection-2 (SR_B2…) band ids.
_ALIASES: dict[str, tuple[str, ...]] = {
    "coastal": ("coastal", "aerosol", "b01", "sr_b1"),
    "blue": ("blue", "b", "b02", "sr_b2"),
    "green": ("green", "g", "b03", "sr_b3"),
    "red": ("red", "r", "b04", "sr_b4"),
    "rededge": ("rededge", "red edge", "b05", "b06", "b07"),
    "nir": ("nir", "near-infrared", "near infrared", "nir08", "b08", "b8a", "sr_b5"),
    "swir16": ("swir16", "swir1", "swir 1", "b11", "sr_b6"),
    "swir22": ("swir22", "swir2", "swir 2", "b12", "sr_b7"),
    "pan": ("pan", "panchromatic"),
}
_BY_ALIAS = {alias: name for name, aliases in _ALIASES.items() for alias in aliases}
_COLOUR_INTERP = {ColorInterp.red: "red", ColorInterp.green: "green", ColorInterp.blue: "blue",
                  ColorInterp.alpha: "alpha", ColorInterp.gray: "gray"}

How = Literal["config", "metadata", "order"]


def common_name(label: str | None) -> str | None:
    """The common band name a description or model band name means, or None."""
    if not label:
        return None
    key = re.sub(r"[\s_]+", " ", label.strip().lower())
    return _BY_ALIAS.get(key) or _BY_ALIAS.get(key.replace(" ", "_")) or (
        key if key in _ALIASES else None)


@dataclass(frozen=True)
class BandChoice:
    """The scene bands that feed the model, in model band order, and how they were chosen."""

    indexes: list[int]
    names: list[str]  # the model band each index feeds
    how: How  # config: input.bands; metadata: matched by name; order: the first N


class BandError(ValueError):
    """The scene's bands cannot be mapped to the model's; the message says what to set."""


def scene_band_labels(ds: DatasetReader) -> list[str | None]:
    """Per scene band, its common name: from its description, else its colour
    interpretation (``gray`` and ``undefined`` name nothing the model could need)."""
    labels: list[str | None] = []
    for i in range(ds.count):
        named = common_name(ds.descriptions[i])
        if named is None:
            named = _COLOUR_INTERP.get(ds.colorinterp[i])
        labels.append(named)
    return labels


def _describe(labels: Sequence[str | None]) -> str:
    return ", ".join(f"{i} {label or '-'}" for i, label in enumerate(labels, 1))


def choose_bands(ds: DatasetReader, model_bands: Sequence[str],
                 configured: Sequence[int | str] | None, name: str) -> BandChoice:
    """The scene bands for a model with ``model_bands``; ``BandError`` says what to set."""
    labels = scene_band_labels(ds)
    wanted = [common_name(b) or b.lower() for b in model_bands]
    need = ", ".join(model_bands)
    if configured is not None:
        return _configured(ds, labels, wanted, list(model_bands), configured, name)
    if all(w in labels for w in wanted):
        return BandChoice([labels.index(w) + 1 for w in wanted], list(model_bands), "metadata")
    if ds.count == len(wanted) and not (set(labels) & (set(_ALIASES) - set(wanted))):
        # As many bands as the model and none named as something else: in order.
        return BandChoice(list(range(1, ds.count + 1)), list(model_bands), "order")
    example = ", ".join(f"<{b}>" for b in model_bands)
    if ds.count < len(wanted):
        repeat = ", ".join(["1"] * len(wanted))
        hint = (f"input.bands: [{repeat}] to run it on band 1 repeated" if ds.count == 1
                else f"input.bands: [{example}] (1-based band numbers; one may repeat)")
        raise BandError(f"{name} has {ds.count} band(s) ({_describe(labels)}); the model "
                        f"needs {len(wanted)} ({need}): set {hint}")
    raise BandError(f"{name} has {ds.count} bands ({_describe(labels)}) and no band "
                    f"descriptions or colour interpretation naming {need}: set input.bands: "
                    f"[{example}], the 1-based scene band numbers holding {need}, in this "
                    f"order (e.g. [3, 2, 1] for a blue, green, red, nir scene), or band "
                    f"names the scene's descriptions carry")


def _configured(ds: DatasetReader, labels: list[str | None], wanted: list[str],
                model_bands: list[str], configured: Sequence[int | str], name: str
                ) -> BandChoice:
    if len(configured) != len(wanted):
        raise BandError(f"input.bands lists {len(configured)} bands, the model needs "
                        f"{len(wanted)} ({', '.join(model_bands)})")
    indexes = []
    descriptions = [(d or "").strip().lower() for d in ds.descriptions]
    for item in configured:
        if isinstance(item, int):
            if not 1 <= item <= ds.count:
                raise BandError(f"{name} has {ds.count} band(s) ({_describe(labels)}); "
                                f"input.bands asks for band {item}")
            indexes.append(item)
            continue
        key = item.strip().lower()
        found = [i + 1 for i, d in enumerate(descriptions) if d == key] or [
            i + 1 for i, label in enumerate(labels) if label is not None
            and label == common_name(item)]
        if not found:
            raise BandError(f"input.bands names {item!r} but {name} has no band called that "
                            f"(its bands: {_describe(labels)}); give its number instead")
        indexes.append(found[0])
    return BandChoice(indexes, model_bands, "config")


def positional_bands(configured: Sequence[int | str] | None, model_bands: Sequence[str]
                     ) -> list[int]:
    """1-based band numbers for a file whose bands follow the model's order (a picture
    chip): numbers are kept, names are looked up among the model's band names."""
    if configured is None:
        return list(range(1, len(model_bands) + 1))
    canon = [common_name(b) or b.lower() for b in model_bands]
    out = []
    for item in configured:
        if isinstance(item, int):
            out.append(item)
        elif (common_name(item) or item.lower()) in canon:
            out.append(canon.index(common_name(item) or item.lower()) + 1)
        else:
            raise BandError(f"input.bands names {item!r}, which is not one of the model's "
                            f"bands ({', '.join(model_bands)})")
    return out
