"""The coordinate codec: pixels <-> the 1,000 quantised coordinate bins ``<0>``..``<999>``.

Every part of rlsys that turns pixels into bins or back (data rendering, reward decoding, the
Serve API, visual prompts) goes through this module, so that training, rewards and inference
agree on one mapping. The released Rex-Omni code uses three different ones (a floor encode in
its SFT data, ``bin / 999`` in its parser, ``bin / 1000`` in its GRPO reward); we keep the
parser's decode and pair it with a rounding encode, which halves the worst round-trip error
(floor loses up to ``size / 999``, rounding at most ``size / 1998``).
"""

from __future__ import annotations

import numpy as np

NUM_BINS = 1000
MAX_BIN = NUM_BINS - 1


def _check_size(size) -> None:
    if np.any(np.asarray(size) <= 0):
        raise ValueError(f"image size must be positive, got {size!r}")


def encode(value, size, floor: bool = False):
    """Pixel coordinate -> bin: ``round(clamp(value / size, 0, 1) * 999)`` (``floor``: rounded down).

    ``value`` and ``size`` are scalars or numpy arrays (broadcast together). Returns a Python
    ``int`` for scalar input, an ``int64`` array otherwise. Values outside ``[0, size]`` are
    clamped: a box that spills over the border is written as touching it. NaN is rejected
    because no bin represents it.
    """
    v = np.asarray(value, dtype=np.float64)
    s = np.asarray(size, dtype=np.float64)
    _check_size(s)
    if np.any(np.isnan(v)):
        raise ValueError(f"cannot encode NaN coordinate (value={value!r})")
    # np.rint rounds half to even; the half-bin case needs value/size*999 exactly x.5, which
    # floating point makes practically irrelevant, and either neighbour is within size/1998.
    scaled = np.clip(v / s, 0.0, 1.0) * MAX_BIN
    # floor: the released Rex-Omni's encoding of visual-prompt boxes (int(x / W * 999))
    bins = (np.floor(scaled) if floor else np.rint(scaled)).astype(np.int64)
    return int(bins) if bins.ndim == 0 else bins


def decode(bin_, size):
    """Bin -> pixel coordinate: ``bin / 999 * size`` (bin 0 is the left/top edge, 999 the right/bottom).

    Scalars give a Python ``float``, arrays a ``float64`` array. Bins outside ``0..999`` raise:
    the parser never produces them, so one here is a caller's bug.
    """
    b = np.asarray(bin_)
    s = np.asarray(size, dtype=np.float64)
    _check_size(s)
    if b.dtype.kind not in "iu" and not np.all(np.equal(np.mod(b, 1), 0)):
        raise ValueError(f"bins must be integers, got {bin_!r}")
    if np.any(b < 0) or np.any(b > MAX_BIN):
        raise ValueError(f"bins must lie in 0..{MAX_BIN}, got {bin_!r}")
    out = b.astype(np.float64) / MAX_BIN * s
    return float(out) if out.ndim == 0 else out


def encode_xy(coords, width, height, floor: bool = False):
    """Encode a flat ``[x0, y0, x1, y1, ...]`` pixel sequence (box, point or polygon) to bins."""
    c = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    return encode(c, np.array([width, height], dtype=np.float64), floor=floor).reshape(-1)


def decode_xy(bins, width, height):
    """Decode a flat ``[bx0, by0, bx1, by1, ...]`` bin sequence to pixels (x by width, y by height)."""
    b = np.asarray(bins).reshape(-1, 2)
    return decode(b, np.array([width, height], dtype=np.float64)).reshape(-1)


def token(bin_: int) -> str:
    """The text of one coordinate token, e.g. ``token(12) == "<12>"``."""
    if not 0 <= int(bin_) <= MAX_BIN:
        raise ValueError(f"bin {bin_} outside 0..{MAX_BIN}")
    return f"<{int(bin_)}>"


COORD_TOKENS = tuple(token(i) for i in range(NUM_BINS))
