"""sd_notify over a real datagram socket, and the unit file checked by systemd-analyze."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from appliance.systemd import Notifier
from tests.conftest import Broker
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


def test_a_static_user_and_reload_on_sighup() -> None:
    text = UNIT.read_text()
    assert not re.search(r"^DynamicUser=yes", text, flags=re.M)
    assert re.search(r"^User=terratile$", text, flags=re.M)
    assert re.search(r"^Group=terratile$", text, flags=re.M)
    assert re.search(r"^ExecReload=/bin/kill -HUP \$MAINPID$", text, flags=re.M)


def _tool(name: str) -> str:
    exe = shutil.which(name)
    if exe is None:
        pytest.skip(f"{name} not installed (Debian package 'systemd'); make system-deps")
    return exe


@pytest.fixture()
def open_root() -> Iterator[Path]:
    """A scratch root other users can traverse (pytest's own tmp folders are 0700)."""
    root = Path(tempfile.mkdtemp(prefix="terratile-root-"))
    os.chmod(root, 0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def test_sysusers_and_tmpfiles_make_a_setgid_inbox_an_uploader_can_fill(
        open_root: Path) -> None:
    """The shipped sysusers/tmpfiles files applied to a scratch root; then, with real
    credentials (``/bin/sh`` run as other uids), an uploader in group terratile drops a file
    and the daemon's user moves it on; a user outside the group cannot."""
    root = open_root
    (root / "etc").mkdir(parents=True)
    for name in ("passwd", "group"):
        shutil.copy(f"/etc/{name}", root / "etc" / name)
    subprocess.run([_tool("systemd-sysusers"), f"--root={root}",
                    str(REPO / "systemd" / "terratile.sysusers")], check=True,
                   capture_output=True)
    users = {line.split(":")[0]: line.split(":") for line in
             (root / "etc" / "passwd").read_text().splitlines()}
    groups = {line.split(":")[0]: line.split(":") for line in
              (root / "etc" / "group").read_text().splitlines()}
    uid, gid = int(users["terratile"][2]), int(groups["terratile"][2])
    assert users["terratile"][6] == "/usr/sbin/nologin"
    assert "terratile" in groups["video"][3].split(",")
    subprocess.run([_tool("systemd-tmpfiles"), f"--root={root}", "--create",
                    str(REPO / "systemd" / "terratile.tmpfiles")], check=True,
                   capture_output=True)
    inbox = root / "var" / "lib" / "terratile" / "inbox"
    st = inbox.stat()
    assert stat.S_IMODE(st.st_mode) == 0o2770 and (st.st_uid, st.st_gid) == (uid, gid)
    assert stat.S_IMODE(inbox.parent.stat().st_mode) == 0o750
    if os.geteuid() != 0:
        pytest.skip("dropping files as another user needs root")
    uploader = 61_234  # a user that is in group terratile only

    def as_user(user: int, groups: list[int], script: str) -> subprocess.CompletedProcess[str]:
        def drop() -> None:
            os.setgroups(groups)
            os.setgid(groups[0])
            os.setuid(user)
            os.umask(0o022)  # an sftp server's usual umask
        return subprocess.run(["/bin/sh", "-c", script], preexec_fn=drop,
                              capture_output=True, text=True)

    up = as_user(uploader, [gid], f"printf x > '{inbox / 'scene.tif'}'")
    assert up.returncode == 0, up.stderr
    dropped = (inbox / "scene.tif").stat()
    assert dropped.st_gid == gid  # setgid: the file belongs to the group
    work = inbox.parent / "work"
    work.mkdir()
    os.chown(work, uid, gid)
    moved = as_user(uid, [gid], f"mv '{inbox / 'scene.tif'}' '{work / 'scene.tif'}' && "
                    f"cat '{work / 'scene.tif'}'")
    assert moved.returncode == 0 and moved.stdout == "x", moved.stderr
    stranger = as_user(61_235, [61_235], f"printf x > '{inbox / 'x.tif'}'")
    assert stranger.returncode != 0 and "Permission denied" in stranger.stderr


def test_sighup_rereads_config_and_model(tmp_path: Path, colour_bundle: Path,
                                         broker: Broker) -> None:
    """What ``systemctl reload`` does to a running daemon: a bad config is refused whole,
    a good one switches the log format at once and names what waits for a restart; the
    store's pointer is followed."""
    from appliance.model.store import ModelStore
    from tests.helpers.colour_bundle import versioned_copy
    from tests.helpers.daemon import DaemonProc

    d = DaemonProc(tmp_path / "box", colour_bundle, broker.port, adapt={"enabled": False})
    try:
        d.start()
        assert d.proc is not None
        config = yaml.safe_load(d.config.read_text())
        d.config.write_text("node_id: [not, valid]\n")
        d.proc.send_signal(signal.SIGHUP)
        d.wait(lambda: b"is not valid; keeping the running configuration" in
               d.log.read_bytes(), "bad config refused")
        config["logging"] = {"format": "json"}
        config["tiling"]["batch_size"] = 8
        d.config.write_text(yaml.safe_dump(config))
        store = ModelStore(d.root / "state" / "models")
        store.install(versioned_copy(colour_bundle, tmp_path / "v2", 2, 1, head_bias=1.0))
        d.proc.send_signal(signal.SIGHUP)
        d.wait(lambda: b'"message": "model v1 \\u2192 v2 (reload)"' in d.log.read_bytes()
               or '"message": "model v1 → v2 (reload)"'.encode() in d.log.read_bytes(),
               "the model switch, logged as JSON")
        lines = [json.loads(line) for line in d.log.read_text().splitlines()
                 if line.startswith("{")]
        assert any("tiling changed; that takes effect after a restart" in r["message"]
                   and r["level"] == "WARNING" for r in lines)
        assert d.terminate() == 0
    finally:
        if d.proc is not None:
            d.kill()
