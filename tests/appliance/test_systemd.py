"""sd_notify over a real datagram socket, and the unit file checked by systemd-analyze."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.systemd import Notifier
from tests.helpers.paths import REPO

UNIT = REPO / "systemd" / "terratile.service"


def test_outside_systemd_everything_is_a_noop() -> None:
    n = Notifier({})
    assert n.address is None and not n.ready("x") and not n.watchdog()


def test_notify_datagrams_reach_the_socket(tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(str(path))
        server.settimeout(2)
        n = Notifier({"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "2000000",
                      "WATCHDOG_PID": str(os.getpid())})
        assert n.watchdog_interval == 1.0
        assert n.ready("ready; queue 0")
        assert server.recv(4096) == b"READY=1\nSTATUS=ready; queue 0"
        assert n.watchdog()
        assert server.recv(4096) == b"WATCHDOG=1"
        assert not n.watchdog()  # rate-limited to half the watchdog interval
        assert n.stopping()
        assert server.recv(4096) == b"STOPPING=1\nSTATUS=stopping"


def test_abstract_socket_and_foreign_watchdog_pid(tmp_path: Path) -> None:
    n = Notifier({"NOTIFY_SOCKET": "@terratile-test", "WATCHDOG_USEC": "1000000",
                  "WATCHDOG_PID": "1"})
    assert n.address == "\0terratile-test"
    assert n.watchdog_interval is None  # the watchdog is meant for another process


def _analyze() -> str:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze not installed (Debian package 'systemd'); "
                    "make system-deps installs it")
    return exe


def _templated_unit(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at an executable that exists on this machine."""
    text = UNIT.read_text()
    text = re.sub(r"^ExecStart=\S+", f"ExecStart={sys.executable} -m appliance", text,
                  flags=re.M)
    out = tmp_path / "terratile.service"
    out.write_text(text)
    return out


def test_unit_verifies_without_warnings(tmp_path: Path) -> None:
    exe = _analyze()
    unit = _templated_unit(tmp_path)
    proc = subprocess.run([exe, "verify", "--man=no", str(unit)], capture_output=True,
                          text=True, env={**os.environ, "SYSTEMD_LOG_LEVEL": "warning"})
    out = (proc.stdout + proc.stderr).strip()
    # Only lines about this unit count; the host's own units are not ours to judge.
    ours = [line for line in out.splitlines() if "terratile" in line]
    assert proc.returncode == 0 and not ours, out


def test_unit_security_exposure_at_most_2(tmp_path: Path) -> None:
    exe = _analyze()
    unit = _templated_unit(tmp_path)
    proc = subprocess.run([exe, "security", "--offline=true", "--no-pager", str(unit)],
                          capture_output=True, text=True)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", proc.stdout + proc.stderr)
    assert match, proc.stdout + proc.stderr
    assert float(match.group(1)) <= 2.0, proc.stdout


def test_unit_keeps_gpu_access_and_credentials() -> None:
    text = UNIT.read_text()
    assert "Type=notify" in text and "WatchdogSec=" in text
    assert not re.search(r"^(PrivateDevices|MemoryDenyWriteExecute)=", text, flags=re.M)
    assert "DeviceAllow=/dev/nvidiactl" in text and "/dev/nvhost-" in text
    assert "LoadCredential=mqtt_password:" in text
