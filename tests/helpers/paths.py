"""Where the checkout's own files are, for tests that read them (unit file, schemas, configs)."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
