"""The daemon as a real subprocess (``python -m appliance run``) with a generated config."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from tests.helpers.paths import REPO

NODE = "edge-t"
P = f"terratile/{NODE}"


class DaemonProc:
    """``terratile run`` in a subprocess with a generated config under ``root``."""

    def __init__(self, root: Path, bundle: Path, port: int, node_id: str = NODE,
                 **overrides: Any) -> None:
        self.root = root
        self.node_id = node_id
        root.mkdir(parents=True, exist_ok=True)
        self.config = root / "appliance.yaml"
        cfg: dict[str, Any] = {
            "node_id": node_id,
            "paths": {"inbox": "inbox", "results": "results", "failed": "failed",
                      "state": "state"},
            "model": {"bundle": str(bundle), "providers": ["cpu"]},
            "tiling": {"scales": [16, 32], "batch_size": 64},
            "input": {"settle_seconds": 0.2, "rescan_seconds": 0.5},
            "mqtt": {"port": port, "reconnect_max_delay": 1, "stats_interval": 1.0},
            "http": {"enabled": False},  # tests that want the web server turn it on
            "log_level": "INFO",
        }
        for section, values in overrides.items():
            cfg[section] = {**cfg.get(section, {}), **values}
        self.config.write_text(yaml.safe_dump(cfg))
        self.inbox = root / "inbox"
        self.log = root / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, **extra_env: str) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        env.pop("NOTIFY_SOCKET", None)
        env.update(extra_env)
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "appliance", "run", "--config", str(self.config)],
                stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        self.wait(lambda: (self.root / "state" / "journal.sqlite").exists()
                  and b"ready: watching" in self.log.read_bytes(), "daemon ready")

    def wait(self, cond: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"daemon exited ({self.proc.returncode}) waiting for "
                                     f"{what}:\n{self.log.read_text()[-4000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}:\n"
                                     f"{self.log.read_text()[-4000:]}")
            time.sleep(0.05)

    def terminate(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=30)
        self.proc = None
        return code

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=10)
        self.proc = None

    def drop(self, src: Path, name: str | None = None) -> Path:
        """Write via ``.part`` + rename, as a well-behaved producer does."""
        target = self.inbox / (name or src.name)
        self.inbox.mkdir(parents=True, exist_ok=True)
        part = target.with_name(target.name + ".part")
        part.write_bytes(src.read_bytes())
        part.rename(target)
        return target

    def scenes(self) -> dict[str, tuple[str, int]]:
        """scene_id → (state, attempts), read straight from the journal."""
        db = self.root / "state" / "journal.sqlite"
        if not db.exists():
            return {}
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as con:
            rows = con.execute("SELECT scene_id, state, attempts FROM scenes").fetchall()
        return {r[0]: (r[1], int(r[2])) for r in rows}

    def outbox_topics(self) -> list[str]:
        """Topics of the messages waiting in the journal's outbox."""
        with sqlite3.connect(f"file:{self.root / 'state' / 'journal.sqlite'}?mode=ro",
                             uri=True, timeout=5) as con:
            return [r[0] for r in con.execute("SELECT topic FROM outbox ORDER BY seq")]
