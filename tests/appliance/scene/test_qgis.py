"""QGIS itself (Debian's python3-qgis, offscreen) opens a real landuse.tif and shows the
class names, with their colours, in its legend."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from appliance.config import Settings
from appliance.contract.bundle import load_bundle
from appliance.model.runtime import ModelRuntime, ProviderPlan
from appliance.scene.pipeline import process_scene
from tests.helpers.scenes import quarters, write_scene

SYSTEM_PYTHON = "/usr/bin/python3"  # QGIS's bindings are built for Debian's own Python
PROBE = """
import json, os, sys
from qgis.core import QgsApplication, QgsRasterLayer
app = QgsApplication([], False)
app.initQgis()
layer = QgsRasterLayer(sys.argv[1], "landuse")
renderer = layer.renderer()
entries = []
if renderer is not None and renderer.type() == "paletted":
    entries = [[c.value, c.label, c.color.name()] for c in renderer.classes()]
print(json.dumps({"valid": layer.isValid(), "renderer": renderer.type() if renderer else None,
                  "classes": entries}), flush=True)
os._exit(0)  # QGIS 3.22 can crash in its own teardown; the answer is already out
"""


def qgis_opens(path: Path) -> dict:
    try:
        found = subprocess.run([SYSTEM_PYTHON, "-c", "import qgis.core"], capture_output=True,
                               timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        found = False
    if not found:
        pytest.skip("QGIS is not installed (make system-deps installs python3-qgis)")
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen", "XDG_RUNTIME_DIR": str(path.parent)}
    env.pop("PYTHONPATH", None)
    out = subprocess.run([SYSTEM_PYTHON, "-c", PROBE, str(path)], capture_output=True,
                         text=True, timeout=120, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_qgis_legend_shows_the_class_names(tmp_path: Path, colour_bundle: Path) -> None:
    runtime = ModelRuntime(load_bundle(colour_bundle), ProviderPlan(providers=("cpu",)))
    scene = write_scene(tmp_path / "s.tif", size=(64, 64), layout=quarters(64, 64))
    settings = Settings.model_validate({"model": {"providers": ["cpu"]},
                                        "tiling": {"scales": [16, 32]}})
    out = process_scene(scene, "ab" * 32, tmp_path / "out", runtime, settings)
    seen = qgis_opens(Path(out.outputs["landuse"]))
    assert seen["valid"] and seen["renderer"] == "paletted"
    assert seen["classes"] == [[float(i), c.name, c.hex] for i, c in
                               enumerate(runtime.manifest.map_classes)]
    assert [c[1] for c in seen["classes"]] == ["urban", "vegetation", "water"]
