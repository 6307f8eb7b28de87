"""Seeds that are stable across processes and machines: crc32 of the arguments (``hash()`` is salted per process)."""

from __future__ import annotations

import zlib

__all__ = ["seed_for"]


def seed_for(*parts) -> int:
    """A 32-bit seed from crc32 of ``parts`` joined by "/" (stable across processes, unlike ``hash()``)."""
    return zlib.crc32("/".join(map(str, parts)).encode())
