"""A real nginx on 127.0.0.1 serving one folder, with byte ranges, ETag and Last-Modified.

Python's ``http.server`` ignores ``Range``, so GDAL's ``/vsicurl/`` would have to read a
whole file from it; nginx serves ranges as object stores do. Its access log records,
per request, the method, path, status, body bytes and the ``Range`` asked for, so a test
or benchmark can count what a reader fetched. nginx comes from Debian (``make
system-deps``); a test that needs it fails with that advice when it is missing.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import rasterio.shutil

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


@dataclass(frozen=True)
class Hit:
    """One request in the access log."""

    method: str
    path: str
    status: int
    body_bytes: int
    range: str


def write_cog(src: Path, dst: Path, blocksize: int = 128) -> Path:
    """``src`` copied as a Cloud-Optimised GeoTIFF (tiles of ``blocksize``, overviews)."""
    rasterio.shutil.copy(src, dst, driver="COG", BLOCKSIZE=blocksize, COMPRESS="DEFLATE")
    return dst


class RangeServer:
    """``with RangeServer(folder, workdir) as server:`` → ``server.url(name)``, ``hits()``."""

    def __init__(self, folder: Path, workdir: Path) -> None:
        if not Path(NGINX).exists():
            raise RuntimeError("nginx is not installed (make system-deps installs it)")
        self.folder = folder
        self.root = workdir
        self.root.mkdir(parents=True, exist_ok=True)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        self.log = self.root / "access.log"
        user = "user root;\n" if os.geteuid() == 0 else ""  # the worker must read tmp dirs
        temp = "".join(f"  {kind}_temp_path {self.root}/{kind};\n"
                       for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        (self.root / "nginx.conf").write_text(
            f"{user}daemon off;\nworker_processes 1;\npid {self.root}/nginx.pid;\n"
            f"error_log {self.root}/error.log;\nevents {{ worker_connections 256; }}\n"
            "http {\n"
            "  log_format hits '$request_method $uri $status $body_bytes_sent \"$http_range\"';\n"
            f"  access_log {self.log} hits;\n{temp}"
            f"  server {{ listen 127.0.0.1:{self.port}; root {folder}; etag on; }}\n"
            "}\n")
        self._proc: subprocess.Popen[bytes] | None = None

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def hits(self) -> list[Hit]:
        """Every request so far (nginx writes each line when the request ends)."""
        if not self.log.exists():
            return []
        out = []
        for line in self.log.read_text().splitlines():
            method, path, status, size, rng = line.split(" ", 4)
            out.append(Hit(method, path, int(status), int(size), rng.strip('"')))
        return out

    def __enter__(self) -> RangeServer:
        self._proc = subprocess.Popen([NGINX, "-c", str(self.root / "nginx.conf"),
                                       "-p", str(self.root)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                if self._proc.poll() is not None:
                    break
                time.sleep(0.05)
        errors = (self.root / "error.log").read_text() if (self.root / "error.log").exists() \
            else ""
        self.__exit__(None, None, None)
        raise RuntimeError(f"nginx did not start: {errors[-2000:]}")

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGQUIT)  # graceful: the log is complete
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=5)
        self._proc = None
