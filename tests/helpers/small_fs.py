"""A small real filesystem for disk-full tests: a tmpfs of a few MB, mounted for the test.

It needs the right to mount (root, or CAP_SYS_ADMIN in a container); where that is
missing the test is skipped with the reason, since no directory can fake ``statvfs``.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def small_tmpfs(where: Path, size_mb: int) -> Iterator[Path]:
    """Mount a ``size_mb`` tmpfs on ``where`` (created), unmount it afterwards."""
    where.mkdir(parents=True, exist_ok=True)
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m,mode=0755",
                            "tmpfs", str(where)], capture_output=True, text=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mount.stderr.strip() or 'not permitted'}); "
                    "the low-disk test needs a small real filesystem")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def fill_until_free(folder: Path, free_mb: float) -> Path:
    """Write a ballast file in ``folder`` until about ``free_mb`` MB are left."""
    import os

    st = os.statvfs(folder)
    free = st.f_bavail * st.f_frsize
    ballast = folder / "ballast.bin"
    with ballast.open("wb") as out:
        out.write(b"\0" * max(int(free - free_mb * (1 << 20)), 0))
    return ballast
