"""The commands that change the running model, as they arrive from outside (MQTT).

Each is validated here and carried out by the model host: ``reload``, ``rollback`` and
``activate`` as tasks on the daemon's main loop (``submit``), ``install`` on its own
worker thread (download, verification and warm-up can take minutes; scenes keep running
meanwhile), which hands the switch to the main loop. A refusal (a bad payload, a bundle
that does not verify or fit, nothing to roll back to) is logged, leaves the running model
as it is, and is announced as a ``ModelNotice`` (the daemon publishes it on
``events/model``), so an operator who is not at the box learns why.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from appliance.contract.bundle import BundleError, Manifest
from appliance.model.host import ModelHost
from appliance.model.install import Installer, InstallRequest

log = logging.getLogger(__name__)

Task = Callable[[], None]


@dataclass(frozen=True)
class ModelNotice:
    """Something about the model worth announcing that is not a switch."""

    action: str  # refused | installed | seed-differs
    request: str  # install | activate | rollback | reload | start
    reason: str | None = None
    target: Manifest | None = None  # the version it is about, when known
    source: str | None = None  # where an install came from


class ModelCommands:
    """``cmd/reload``, ``cmd/rollback``, ``cmd/activate`` and ``cmd/install`` for one host."""

    def __init__(self, host: ModelHost, submit: Callable[[Task], None],
                 notify: Callable[[ModelNotice], None] = lambda _notice: None,
                 installer: Installer | None = None) -> None:
        self.host = host
        self._submit = submit
        self._notify = notify
        self._installer = installer
        self._install_worker = ThreadPoolExecutor(max_workers=1,
                                                  thread_name_prefix="model-install")

    def reload(self, _payload: bytes = b"") -> None:
        self._submit(lambda: self._guarded("reload", self.host.reload))

    def rollback(self, _payload: bytes = b"", then: Task | None = None) -> None:
        """Run the previous version; ``then`` runs after it, done or refused (the
        dashboard waits on it)."""
        def task() -> None:
            try:
                self._guarded("rollback", self.host.rollback)
            finally:
                if then is not None:
                    then()

        self._submit(task)

    def activate(self, payload: bytes) -> None:
        """``{"version": N}``: run installed version N."""
        try:
            version = json.loads(payload)["version"]
            if not isinstance(version, int) or isinstance(version, bool) or version < 1:
                raise TypeError(f"version must be a positive integer, got {version!r}")
        except (ValueError, KeyError, TypeError) as exc:
            self._refuse("activate", f"expected {{\"version\": N}}: {exc}")
            return
        self._submit(lambda: self._guarded("activate", lambda: self.host.activate(version)))

    def install(self, payload: bytes) -> None:
        """``{"source": path-or-URL, "sha256": manifest digest, "activate": bool}``."""
        if self._installer is None:
            self._refuse("install", "installing is not available on this node")
            return
        try:
            request = InstallRequest.from_payload(payload)
        except ValueError as exc:
            self._refuse("install", f"expected {{\"source\": …, \"sha256\": …, "
                                    f"\"activate\": …}}: {exc}")
            return
        self._install_worker.submit(self._install, self._installer, request)

    def close(self) -> None:
        """Stop taking installs; one under way is abandoned at its next step (a scratch
        folder left behind is removed by the store's cleanup at the next start)."""
        if self._installer is not None:
            self._installer.cancel()
        self._install_worker.shutdown(wait=False, cancel_futures=True)

    def _install(self, installer: Installer, request: InstallRequest) -> None:
        """Install worker: fetch, verify, install, warm; the switch goes to the main loop."""
        try:
            installed = installer.install(request)
        except BundleError as exc:
            self._refuse("install", str(exc), source=request.source)
            return
        except Exception as exc:  # never lose the refusal of a request
            log.exception("install of %s failed", request.source)
            self._refuse("install", f"internal error: {type(exc).__name__}: {exc}",
                         source=request.source)
            return
        staged = installed.staged
        if staged is None:
            self._notify(ModelNotice("installed", "install", target=installed.bundle.manifest,
                                     source=request.source))
            return
        self._submit(lambda: self._guarded(
            "install", lambda: self.host.switch(staged, "install", source=request.source),
            request.source))

    def _guarded(self, what: str, step: Callable[[], object], source: str | None = None
                 ) -> None:
        try:
            step()
        except BundleError as exc:
            self._refuse(what, str(exc), source=source)

    def _refuse(self, what: str, reason: str, source: str | None = None) -> None:
        log.error("%s refused: %s", what, reason)
        self._notify(ModelNotice("refused", what, reason=reason, source=source))
