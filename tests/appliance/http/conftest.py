"""A real daemon with its HTTP server on a free port, a real broker, two model versions."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from appliance.contract.bundle import read_manifest, seal_bundle
from appliance.model.store import ModelStore
from tests.conftest import Broker, free_port
from tests.helpers.colour_bundle import versioned_copy
from tests.helpers.daemon import DaemonProc

TOKEN = "test-token-0123456789abcdef"
GATE = {"passed": True, "failures": [], "source_acc_before": 0.97, "source_acc_after": 0.96,
        "agreement_before": 0.81, "agreement_after": 0.9}


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Box:
    """The daemon and how to talk to its HTTP server."""

    daemon: DaemonProc
    url: str

    def get(self, path: str, token: str | None = None) -> Reply:
        return self.request("GET", path, token)

    def request(self, method: str, path: str, token: str | None = None,
                cookie: str | None = None) -> Reply:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        if cookie:
            headers["Cookie"] = f"terratile_token={cookie}"
        req = urllib.request.Request(self.url + path, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return Reply(r.status, dict(r.headers), r.read())
        except urllib.error.HTTPError as exc:
            return Reply(exc.code, dict(exc.headers), exc.read())

    def wait_done(self, count: int, timeout: float = 120) -> None:
        self.daemon.wait(lambda: sum(1 for s, _ in self.daemon.scenes().values()
                                     if s in ("done", "failed")) >= count
                         and self.get("/api/status").json()["status"]["state"] == "ready",
                         f"{count} scene(s) ended", timeout)


def start_box(root: Path, bundle: Path, broker: Broker, two_versions: bool = False,
              token: bool = True, **overrides: Any) -> Box:
    """A daemon under ``root`` serving HTTP on a free port (with ``token``: ``TOKEN`` in
    ``root/token``)."""
    root.mkdir(parents=True, exist_ok=True)
    token_file = root / "token"
    token_file.write_text(TOKEN + "\n")
    if two_versions:  # v1 (the seed) and its child v2, running v2: a rollback has a target
        store = ModelStore(root / "state" / "models")
        store.install(bundle)
        child = versioned_copy(bundle, root / "v2-bundle", 2, 1, head_bias=1.0)
        manifest = read_manifest(child)  # as an adaptation job leaves it: its gate figures
        seal_bundle(child, manifest.model_copy(update={
            "notes": "adapted (head) from v1: drift",
            "metrics": {**manifest.metrics, "adaptation": {"reason": "drift", "step": "head",
                                                          "gate": GATE}}}))
        store.install(child)
    port = free_port()
    http = {"enabled": True, "port": port, **({"token_file": str(token_file)} if token else {}),
            **overrides.pop("http", {})}
    daemon = DaemonProc(root, bundle, broker.port, http=http, **overrides)
    daemon.start()
    host = http.get("host", "127.0.0.1")
    url = f"http://{'127.0.0.1' if host == '0.0.0.0' else host}:{port}"
    box = Box(daemon, url)
    deadline = time.monotonic() + 30
    while True:  # the server answers before READY; wait for it
        try:
            if box.get("/healthz").status == 200:
                return box
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError("the HTTP server did not answer:\n" + daemon.log.read_text())
        time.sleep(0.1)


@pytest.fixture()
def box(tmp_path: Path, colour_bundle: Path, broker: Broker) -> Iterator[Box]:
    b = start_box(tmp_path / "box", colour_bundle, broker, two_versions=True)
    yield b
    if b.daemon.proc is not None:
        b.daemon.terminate()
