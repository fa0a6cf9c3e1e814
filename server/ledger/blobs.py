"""The stored bytes of one contribution: its safetensors file, compressed with zlib.

Measured on a real TAFT-1 Δ of a 60-image site (make simulate's defaults): 1,779,082 float32
entries, 7,116,328 bytes as safetensors, of which 99.8 % are exactly zero (the short-schedule
guard sent the fitted head: only the head is non-zero); the Δ family leaves its all-zero tensors
out of the bytes (server.ledger.families.DeltaFamily.encode) and zlib keeps 15 KB of the rest.
Compression is lossless, so what ``decode`` returns is exactly what was received, and
deterministic (same bytes, same level, same output), so equal contributions still have equal sha256. A blob without the prefix is an
uncompressed safetensors file, as ledgers wrote before (safetensors starts with its header's
length as a little-endian u64, which the prefix as a number — far beyond any file — can never be).
"""
from __future__ import annotations

import zlib

PREFIX = b"taft-z1\n"
LEVEL = 1  # fastest: a Δ or a site's rows are compressed inside the ledger's write transaction
#: the most bytes one stored contribution may inflate to (a tampered file must not exhaust memory)
MAX_INFLATED = 2 ** 31


def pack(data: bytes) -> bytes:
    return PREFIX + zlib.compress(data, LEVEL)


def unpack(blob: bytes) -> bytes:
    """The safetensors bytes of a stored blob (compressed or, from older ledgers, plain)."""
    blob = bytes(blob)
    if not blob.startswith(PREFIX):
        return blob
    inflater = zlib.decompressobj()
    data = inflater.decompress(memoryview(blob)[len(PREFIX):], MAX_INFLATED)
    if inflater.unconsumed_tail or not inflater.eof:
        raise ValueError(f"a stored contribution inflates beyond {MAX_INFLATED} bytes or is truncated")
    return data
