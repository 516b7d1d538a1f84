"""The commands that change the running model, as they arrive from outside (MQTT).

Each is validated here and carried out by the model host; a refusal (a bad payload, a
version that does not verify, nothing to roll back to) is logged and leaves the running
model as it is. The daemon queues the tasks these return on its main loop.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

from appliance.contract.bundle import BundleError
from appliance.model.host import ModelHost

log = logging.getLogger(__name__)

Task = Callable[[], None]


class ModelCommands:
    """``cmd/reload``, ``cmd/rollback`` and ``cmd/activate`` for one model host."""

    def __init__(self, host: ModelHost) -> None:
        self.host = host

    def reload(self, _payload: bytes = b"") -> Task:
        return lambda: self._guarded("reload", self.host.reload)

    def rollback(self, _payload: bytes = b"") -> Task:
        return lambda: self._guarded("rollback", self.host.rollback)

    def activate(self, payload: bytes) -> Task:
        """``{"version": N}``: run installed version N."""
        try:
            version = json.loads(payload)["version"]
            if not isinstance(version, int) or isinstance(version, bool) or version < 1:
                raise TypeError(f"version must be a positive integer, got {version!r}")
        except (ValueError, KeyError, TypeError) as exc:
            reason = f"expected {{\"version\": N}}: {exc}"
            return lambda: log.error("activate refused: %s", reason)
        return lambda: self._guarded(f"activate v{version}",
                                     lambda: self.host.activate(version))

    @staticmethod
    def _guarded(what: str, step: Callable[[], object]) -> None:
        try:
            step()
        except BundleError as exc:
            log.error("%s refused: %s", what, exc)
