"""Fixtures shared by every test package: bundles, scenes, and a real mosquitto broker."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.colour_bundle import build_colour_bundle

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"  # ../shared beside the checkout


def shared_data() -> Path:
    """``../shared/data`` or a clear skip when it is not beside the checkout."""
    if not SHARED.is_dir():
        pytest.skip(f"shared data not found at {SHARED}; this test needs ../shared/data")
    return SHARED


@pytest.fixture(scope="session")
def colour_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A sealed, deterministic colour-classifier bundle (see tests/helpers/colour_bundle.py)."""
    return build_colour_bundle(tmp_path_factory.mktemp("bundle") / "colour")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Broker:
    """A real mosquitto on 127.0.0.1 on a free port; stop/start to simulate outages."""

    def __init__(self, workdir: Path) -> None:
        exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if not Path(exe).exists():
            pytest.fail("mosquitto is not installed (make test installs it with apt-get)")
        self.exe = exe
        self.port = free_port()
        self.conf = workdir / "mosquitto.conf"
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\n"
            "max_queued_messages 100000\nmax_inflight_messages 0\npersistence false\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen([self.exe, "-c", str(self.conf)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("mosquitto did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None


@pytest.fixture()
def broker(tmp_path: Path) -> Iterator[Broker]:
    """A fresh mosquitto per test (tests stop and restart it at will)."""
    b = Broker(tmp_path)
    b.start()
    yield b
    b.stop()


@pytest.fixture(autouse=True)
def _bounded_gdal_cache() -> None:
    os.environ.setdefault("GDAL_CACHEMAX", "64")
