"""``/healthz`` and ``/readyz`` on a real daemon; the disk floor crossed on a real tmpfs."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.appliance.http.conftest import start_box
from tests.conftest import Broker

FLOOR_MB = 8


@pytest.fixture()
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 24 MB tmpfs (needs root, as in CI); skipped with the reason where mounting fails."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def test_readyz_follows_the_disk_floor(tmp_path: Path, colour_bundle: Path, broker: Broker,
                                       small_disk: Path) -> None:
    box = start_box(tmp_path / "box", colour_bundle, broker,
                    paths={"results": str(small_disk / "results"), "min_free_mb": FLOOR_MB})
    try:
        assert box.get("/healthz").json() == {"alive": True}
        ready = box.get("/readyz")
        assert ready.status == 200 and ready.json()["ready"] is True
        filler = small_disk / "filler.bin"
        filler.write_bytes(b"\0" * (20 * 1024 * 1024))  # leaves < 8 MB of 24
        unready = box.get("/readyz")
        assert unready.status == 503
        checks = {c["name"]: c for c in unready.json()["checks"]}
        assert checks["disk:results"]["ok"] is False
        assert f"floor {FLOOR_MB} MB" in checks["disk:results"]["detail"]
        assert checks["model"]["ok"] and checks["journal"]["ok"] and checks["disk:state"]["ok"]
        assert box.get("/healthz").status == 200  # alive all the same: no restart for this
        filler.unlink()
        again = box.get("/readyz")
        assert again.status == 200 and again.json()["ready"] is True
    finally:
        box.daemon.terminate()


def test_readyz_is_unready_while_the_journal_refuses_writes(
        tmp_path: Path, colour_bundle: Path, broker: Broker) -> None:
    """Another process holding the journal's write lock past the busy timeout: unready."""
    box = start_box(tmp_path / "box", colour_bundle, broker)
    try:
        journal = box.daemon.root / "state" / "journal.sqlite"
        assert box.get("/readyz").status == 200
        holder = subprocess.Popen(  # another writer holds the write lock past busy_timeout
            [sys.executable, "-c", "import sqlite3, sys, time; db = sqlite3.connect(sys.argv[1], "
             "isolation_level=None); db.execute('BEGIN IMMEDIATE'); print('held', flush=True); "
             "time.sleep(30)", str(journal)], stdout=subprocess.PIPE, text=True)
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        try:
            unready = box.get("/readyz")
            checks = {c["name"]: c for c in unready.json()["checks"]}
            assert unready.status == 503 and checks["journal"]["ok"] is False
        finally:
            holder.kill()
            holder.wait()
        assert box.get("/readyz").status == 200
    finally:
        box.daemon.terminate()
