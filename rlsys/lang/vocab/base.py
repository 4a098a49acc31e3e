"""What every spatial vocabulary shares: the names, the mask refusal, the processor's resize rule
and the helpers that assemble a parse result."""

from __future__ import annotations

import math

from rlsys.lang.format import (
    KeypointInstance,
    Parsed,
    Prediction,
)

# The vocabularies that write masks (a set of grid points per mask, GETok section 3.2.1); a mask
# output asked of another is refused when the config and the data are checked.
MASK_VOCABULARIES = ("getok",)


def _no_masks(name: str) -> str:
    return (
        f"model.vocabulary {name} cannot write masks (output 'mask'): only "
        f"{', '.join(MASK_VOCABULARIES)} writes a mask, as a set of grid points"
    )


def check_writes_masks(vocabulary) -> None:
    """Raise ``ValueError`` naming ``vocabulary`` unless it writes masks (:data:`MASK_VOCABULARIES`)."""
    if vocabulary.name not in MASK_VOCABULARIES:
        raise ValueError(_no_masks(vocabulary.name))


def _refuse_masks(name: str, preds) -> None:
    if any(p.kind == "mask" for p in preds):
        raise ValueError(_no_masks(name))


def resized_size(width: int, height: int, min_pixels: int, max_pixels: int, factor: int = 28) -> tuple[int, int]:
    """``(width, height)`` of an image after Qwen2-VL's processor resize: each side rounded to a
    multiple of ``factor``, then scaled (keeping the aspect ratio) so the area lies in
    [min_pixels, max_pixels], sides floored (too large) or ceiled (too small) to the factor."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if max(width, height) / min(width, height) > 200:
        raise ValueError(f"image {width}x{height}: aspect ratio over 200, which the processor refuses")
    h = round(height / factor) * factor  # Python's round (half to even), as the processor's
    w = round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return w, h


def _group(items: list[tuple[str, str, tuple]]) -> list[Prediction]:
    """(phrase, kind, coords) in reading order -> one Prediction per (phrase, kind), in order of
    first appearance (as :func:`rlsys.lang.format.parse` groups a phrase's instances)."""
    out: dict[tuple[str, str], list[tuple]] = {}
    for phrase, kind, c in items:
        out.setdefault((phrase, kind), []).append(c)
    return [Prediction(p, k, tuple(cs)) for (p, k), cs in out.items()]


def _parsed(preds, unreadable: int, errors: list[str], answered: bool, written) -> Parsed:
    p = Parsed(preds, unreadable, errors)
    p.answered, p.written = answered, [tuple(c) for c in written]
    return p


def _unread_masks(name: str) -> Parsed:
    """A mask answer read by a vocabulary that has no masks: one unreadable fragment, why."""
    return _parsed([], 1, [_no_masks(name)], False, [])


class _Instances(list):
    """Keypoint instances in pixels, with ``written``: each one's box as the model wrote it."""

    def __init__(self, items=(), written=()):
        super().__init__(items)
        self.written = [tuple(c) for c in written]

    @classmethod
    def in_pixels(cls, insts, px) -> _Instances:
        """``insts`` (parsed, in the vocabulary's coordinates) with every box and keypoint mapped
        by ``px`` to pixels; an invisible keypoint stays ``None``; ``written`` keeps the boxes
        as written."""
        return cls(
            [
                KeypointInstance(i.name, px(i.box), {k: None if v is None else px(v) for k, v in i.keypoints.items()})
                for i in insts
            ],
            [i.box for i in insts],
        )
