"""Who may use the HTTP server: the token of ``http.token_file``.

A token is presented as ``Authorization: Bearer <token>`` (Prometheus' ``authorization``
scrape setting, ``curl -H``) or, for what a browser loads by itself (pictures, the event
stream), as the ``terratile_token`` cookie that the page sets when the token is typed in.

* Bound to the loopback address, reading needs nothing: only this machine reaches it.
* Bound beyond it (the config refuses that without a token), every read but the two
  health probes needs the token.
* Changing the model needs the token always, and only in the header: a cookie is sent
  by the browser with any request to the host, so another web site could use it, while a
  header must be set by the page itself.
"""

from __future__ import annotations

import hmac

from starlette.requests import Request

from appliance.config import HTTPConfig

COOKIE = "terratile_token"


class Access:
    """Checks requests against the configured token."""

    def __init__(self, cfg: HTTPConfig) -> None:
        self._token = cfg.token()
        self._protect_reads = not cfg.loopback

    @property
    def writes_enabled(self) -> bool:
        """False when no token is configured: the page cannot change the model."""
        return self._token is not None

    def may_read(self, request: Request) -> bool:
        if not self._protect_reads:
            return True
        return self._matches(_bearer(request)) or self._matches(request.cookies.get(COOKIE))

    def may_write(self, request: Request) -> bool:
        return self._matches(_bearer(request))

    def _matches(self, presented: str | None) -> bool:
        if self._token is None or presented is None:
            return False
        return hmac.compare_digest(presented.encode(), self._token.encode())


def _bearer(request: Request) -> str | None:
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None
