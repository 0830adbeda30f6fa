"""The yardstick of `carlos eval`: what classical compressors achieve on the bytes a model is scored on.

A compressor's bits per byte on a split is its conditional size, size(context + split) - size(context), with
the context the end of the train split: the compressor has read the training text first, as the model has,
and an adaptive one (PPMd, 7-Zip's text compressor) keeps learning from the split as it goes. The context is
capped (eval's compressor_context), so that the cost stays bounded on a large corpus."""

from __future__ import annotations

import bz2
import lzma
import zlib
from collections.abc import Callable


def _ppmd(data: bytes) -> bytes:
    import pyppmd  # an optional extra: pip install pyppmd

    return pyppmd.compress(data, max_order=6, mem_size=64 << 20)


# name -> compress; the settings of each tool's strongest standard level
COMPRESSORS: dict[str, Callable[[bytes], bytes]] = {
    "zlib -9": lambda data: zlib.compress(data, 9),
    "bzip2 -9": lambda data: bz2.compress(data, 9),
    "xz -9e": lambda data: lzma.compress(data, preset=9 | lzma.PRESET_EXTREME),
    "PPMd order 6": _ppmd,
}


def ppmd_missing() -> str | None:
    """Why PPMd cannot be measured here, or None."""
    try:
        import pyppmd  # noqa: F401
    except ImportError:
        return "PPMd needs the pyppmd package: pip install pyppmd (or the project's [compressors] extra)"
    return None


def compressed_bpb(context: bytes, text: bytes) -> dict[str, float]:
    """Bits per byte of `text` after `context`, for each compressor this machine has."""
    missing = ppmd_missing()
    result = {}
    for name, compress in COMPRESSORS.items():
        if name.startswith("PPMd") and missing:
            continue
        extra = len(compress(context + text)) - (len(compress(context)) if context else 0)
        result[name] = 8 * extra / max(len(text), 1)
    return result
