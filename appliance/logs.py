"""Log output: one line per record on stderr, shaped for where it goes.

* Under journald (systemd sets ``$JOURNAL_STREAM`` to the device and inode of the stream
  it reads, and this process's stderr is that stream) the line carries no timestamp —
  journald stamps every line itself — and starts with the syslog priority (``<3>`` for
  an error) so ``journalctl -p warning`` filters by level.
* Elsewhere the line starts with the local time.
* ``logging.format: json`` writes one JSON object per line instead (``ts`` in UTC,
  ``level``, ``logger``, ``message``, ``exc`` with the traceback), for log shippers.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import datetime, timezone
from typing import TextIO

from appliance.config import Settings

TEXT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
JOURNAL_TEXT = "%(levelname)s %(name)s: %(message)s"
SYSLOG_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4,
                   logging.INFO: 6, logging.DEBUG: 7}


def under_journald(stream: TextIO, environ: dict[str, str] | None = None) -> bool:
    """Whether ``stream`` is the stream systemd connected to journald."""
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    device, _, inode = value.partition(":")
    if not (device.isdigit() and inode.isdigit()):
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError):
        return False
    return (st.st_dev, st.st_ino) == (int(device), int(inode))


class JournalFormatter(logging.Formatter):
    """Text without a timestamp, prefixed with the syslog priority journald reads."""

    def __init__(self) -> None:
        super().__init__(JOURNAL_TEXT)

    def format(self, record: logging.LogRecord) -> str:
        priority = SYSLOG_PRIORITY.get(record.levelno, 6)
        return "\n".join(f"<{priority}>{line}" for line in super().format(record).splitlines())


class JsonFormatter(logging.Formatter):
    """One JSON object per record (newlines in messages stay inside the string)."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": datetime.fromtimestamp(record.created, timezone.utc)
               .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
               "level": record.levelname, "logger": record.name,
               "message": record.getMessage()}
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def formatter_for(settings: Settings, stream: TextIO) -> logging.Formatter:
    if settings.logging.format == "json":
        return JsonFormatter()
    return JournalFormatter() if under_journald(stream) else logging.Formatter(TEXT)


def setup_logging(settings: Settings, stream: TextIO | None = None,
                  level: str | None = None) -> None:
    """Configure the root logger (again, on a reload): level (``level`` over the
    settings', e.g. a quiet CLI), one stderr handler."""
    stream = sys.stderr if stream is None else stream
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter_for(settings, stream))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level or settings.log_level)
