"""docs/operate.md's "Install on an edge box", run literally: a fresh virtual environment
with the base install from the package index, the unit, user, inbox, config and seed
bundle under a scratch root; then the installed ``terratile`` processes a real scene.

It needs the package index (PyPI or the configured mirror) and takes minutes; without
the index it is skipped with the reason."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.paths import REPO
from tests.helpers.scenes import write_scene

DOC = REPO / "docs" / "operate.md"
MARKER = "<!-- edge-install:"
SOURCE_PARTS = ("pyproject.toml", "README.md", "appliance", "export", "systemd", "configs")


def install_block() -> str:
    """The fenced bash block right after the edge-install marker."""
    text = DOC.read_text()
    at = text.index(MARKER)
    match = re.compile(r"```bash\n(.*?)```", re.S).search(text, at)
    assert match is not None, "no bash block after the edge-install marker"
    return match.group(1)


def index_reachable(scratch: Path) -> str | None:
    """None when pip can reach its package index, else why not."""
    try:
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps",
                               "--disable-pip-version-check", "--dest", str(scratch),
                               "--quiet", "--no-cache-dir", "six"], capture_output=True,
                              text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return "the package index did not answer within 60 s"
    return None if proc.returncode == 0 else (proc.stderr.strip()[-300:] or "pip failed")


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_the_documented_edge_install_works_in_a_fresh_root(tmp_path: Path,
                                                           colour_bundle: Path) -> None:
    for tool in ("systemd-sysusers", "systemd-tmpfiles"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed (Debian package 'systemd'); make system-deps")
    why = index_reachable(tmp_path / "probe")
    if why is not None:
        pytest.skip(f"package index not reachable: {why}")
    src = tmp_path / "src"  # a clean copy: pip builds in the source tree
    src.mkdir()
    for part in SOURCE_PARTS:
        path = REPO / part
        if path.is_dir():
            shutil.copytree(path, src / part, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(path, src / part)
    root = tmp_path / "root"
    root.mkdir()
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path),
           "ROOT": str(root), "SRC": str(src), "SEED": str(colour_bundle)}
    for key in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_CONFIG_FILE", "PIP_CACHE_DIR",
                "XDG_CACHE_HOME"):
        if key in os.environ:
            env[key] = os.environ[key]
    python_dir = str(Path(sys.base_prefix) / "bin")  # python3 for the venv, as on a box
    env["PATH"] = f"{python_dir}:{env['PATH']}"
    run = subprocess.run(["bash", "-euo", "pipefail", "-c", install_block()], env=env,
                         capture_output=True, text=True, timeout=2200)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "appliance.yaml: OK" in run.stdout

    venv = root / "opt" / "terratile" / ".venv"
    listed = subprocess.run([str(venv / "bin" / "pip"), "list", "--format=json",
                             "--disable-pip-version-check"], capture_output=True, text=True,
                            check=True)
    installed = {p["name"].lower() for p in json.loads(listed.stdout)}
    assert {"terratile", "onnxruntime", "rasterio", "faiss-cpu", "paho-mqtt"} <= installed
    assert not installed & {"onnxruntime-gpu", "torch", "torchvision", "timm"}, installed

    passwd = (root / "etc" / "passwd").read_text()
    assert re.search(r"^terratile:x:\d+:\d+:.*:/var/lib/terratile:/usr/sbin/nologin$",
                     passwd, flags=re.M)
    inbox = root / "var" / "lib" / "terratile" / "inbox"
    assert stat.S_IMODE(inbox.stat().st_mode) == 0o2770
    unit = (root / "etc" / "systemd" / "system" / "terratile.service").read_text()
    assert "ExecStart=/opt/terratile/.venv/bin/terratile run" in unit
    assert (root / "var" / "lib" / "terratile" / "seed" / "manifest.json").is_file()

    # The installed command on a real scene, with the installed config (paths moved
    # under the scratch root by environment overrides, as terratile.env would).
    lib = root / "var" / "lib" / "terratile"
    scene = write_scene(tmp_path / "halves.tif", size=(128, 128))
    overrides = {"TERRATILE_MODEL__BUNDLE": str(lib / "seed"),
                 "TERRATILE_PATHS__STATE": str(lib / "state"),
                 "TERRATILE_PATHS__RESULTS": str(lib / "results"),
                 "TERRATILE_PATHS__FAILED": str(lib / "failed"),
                 "TERRATILE_PATHS__INBOX": str(inbox)}
    proc = subprocess.run([str(venv / "bin" / "terratile"), "process", str(scene), "--config",
                           str(root / "etc" / "terratile" / "appliance.yaml")],
                          env={**env, **overrides}, capture_output=True, text=True,
                          cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["classes"]["urban"]["fraction"] == pytest.approx(0.5, abs=0.05)
    # The CPU runtime says loudly that the configured GPU providers are not there.
    assert ("provider TensorrtExecutionProvider requested but not in this onnxruntime "
            "build") in proc.stderr
