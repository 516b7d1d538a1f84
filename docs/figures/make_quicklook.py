"""Regenerate docs/figures/quicklook-cogeo.png: the quicklook of a real scene.

Runs ``terratile process`` (the real CLI, CPU) with the fine-tuned AID bundle on
``../shared/data/scenes/cogeo.tif`` and copies the scene's ``quicklook.png`` here.

    python docs/figures/make_quicklook.py [BUNDLE] [SCENE]
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
BUNDLE = REPO.parent / "runs" / "aid_ft" / "bundle_renorm"
SCENE = REPO.parent / "shared" / "data" / "scenes" / "cogeo.tif"
OUT = Path(__file__).with_name("quicklook-cogeo.png")


def main() -> None:
    bundle = Path(sys.argv[1]) if len(sys.argv) > 1 else BUNDLE
    scene = Path(sys.argv[2]) if len(sys.argv) > 2 else SCENE
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "appliance.yaml"
        config.write_text(yaml.safe_dump({
            "paths": {"inbox": "inbox", "results": "results", "failed": "failed",
                      "state": "state"},
            "model": {"bundle": str(bundle), "providers": ["cpu"]},
            "mqtt": {"enabled": False}}))
        done = subprocess.run([sys.executable, "-c", "from appliance.cli.main import app; app()",
                               "process", str(scene), "--config", str(config)],
                              check=True, capture_output=True, text=True, cwd=REPO)
        result = json.loads(done.stdout)
        shutil.copyfile(result["outputs"]["quicklook"], OUT)
    top = sorted(result["classes"].items(), key=lambda kv: -kv[1]["fraction"])[:3]
    shares = ", ".join(f"{name} {share['fraction']:.0%}" for name, share in top)
    print(f"{OUT}: {shares}")


if __name__ == "__main__":
    main()
