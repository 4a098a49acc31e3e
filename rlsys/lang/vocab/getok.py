"""GETok's grid tokens ``<gridX_Y>`` with offsets and ``<DELETE>``."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from rlsys.lang.format import (
    Deleted,
    KeypointInstance,
    Parsed,
    Prediction,
    check_kind,
)
from rlsys.lang.format import (
    parse as parse_bins,
)
from rlsys.lang.format import (
    parse_keypoints as parse_keypoint_bins,
)
from rlsys.lang.format import (
    render as render_markup,
)
from rlsys.lang.format import (
    render_keypoints as render_keypoint_bins,
)
from rlsys.lang.vocab.base import _Instances, _parsed

# ---------------------------------------------------------------------------------------------
_GRID_TOKEN = re.compile(r"<grid(\d+)_(\d+)>")
_POINT = re.compile(r"\s*<grid(\d+)_(\d+)>\s*(?:<OFF(-?\d+)_(-?\d+)>|(<DELETE>))?")
_GETOK_RUN = re.compile(r"((?:<grid\d+_\d+>(?:<OFF-?\d+_-?\d+>|<DELETE>)?)+)")
OFFSETS = tuple((dx, dy) for dy in (-1, 0, 1) for dx in (-1, 0, 1))
DELETE = "<DELETE>"


def getok_tokens(grid: int) -> tuple[str, ...]:
    """GETok's added tokens for a ``grid`` x ``grid`` lattice: ``<gridX_Y>`` row by row, the nine
    offsets ``<OFFdx_dy>`` (dx, dy in -1, 0, 1) and ``<DELETE>``: grid² + 10 tokens. The paper
    spells them ``<gridX,Y>`` and ``<OFFdx,dy>``; the comma would clash with the markup's
    instance separator, so an underscore takes its place (the tokens are learned either way)."""
    return (
        tuple(f"<grid{x}_{y}>" for y in range(grid) for x in range(grid))
        + tuple(f"<OFF{dx}_{dy}>" for dx, dy in OFFSETS)
        + (DELETE,)
    )


@dataclass(frozen=True)
class GETok:
    """GETok's grid and offset tokens (``getok-grounding-everything-in-tokens``, section 3.1).

    The image is a ``grid`` x ``grid`` lattice; ``<gridX_Y>`` stands for the centre of cell
    (X, Y) (X the column, Y the row), so a point is one token and a box two (its top-left and
    bottom-right corners), a polygon one per vertex, in :mod:`rlsys.lang.format`'s markup. An offset
    token after a grid token moves that point by a third of a cell in each direction
    (``<OFF1_-1>``: right and up), which makes the nine positions of a cell a uniform 3·grid
    lattice: with the paper's grid of 32, points land within 1/192 of the image side, against
    1/64 for grid tokens alone (and 1/1998 for the 1,000 bins). ``<DELETE>`` after a grid token
    withdraws that point: a point or box with a withdrawn point is no prediction (not an
    unreadable one either); a polygon loses the vertex, and is withdrawn below 3 vertices.

    Masks (section 3.2.1) are sets of grid points, one instance per mask in the same markup:
    ``<grid3_4><OFF0_0><grid4_4><OFF0_0>,<grid9_2><OFF0_0>`` is two masks. Targets hold the
    points :func:`rewards.mask.mask_to_grid_points` picks for the GT mask (rendered like any
    points); :meth:`parse_masks` reads an answer to a mask question, where every instance is a
    set of any number of points (a withdrawn point leaves the set; a set of only withdrawn
    points is no prediction). The paper wraps a mask in ``<seg>...</seg>``; here the question
    says masks are asked for, as it does for keypoints, so no tokens are added for it.

    ``offsets`` says whether targets are rendered with an offset after every grid token (the
    3·grid precision) or grid tokens alone (the paper's first stage); answers are read either
    way. The paper's second RL stage, multi-turn refinement with offsets and ``<DELETE>``, needs
    multi-turn rollouts and is not here. ``written`` coordinates are in cells (X + 0.5 + dx/3).
    """

    grid: int = 32
    offsets: bool = True
    name: str = "getok"

    def for_sample(self, sample):
        return self  # nothing per sample: the answer's geometry is self-contained

    def for_proposals(self, boxes, width: int, height: int):
        return self

    def __post_init__(self):
        if not 2 <= self.grid <= 256:
            raise ValueError(f"getok grid must be 2..256 cells per side, got {self.grid}")

    def added_tokens(self) -> tuple[str, ...]:
        return getok_tokens(self.grid)

    # pixels <-> cells; with offsets the 3·grid sub-lattice
    def _token(self, v: float, size: float) -> tuple[int, int]:
        if math.isnan(v):
            raise ValueError("cannot render a NaN coordinate")
        sub = 3 if self.offsets else 1
        k = min(max(math.floor(v / size * self.grid * sub), 0), self.grid * sub - 1)
        return (k // 3, k % 3 - 1) if self.offsets else (k, 0)

    def write(self, values, width: float, height: float) -> str:
        """A flat pixel sequence ``[x0, y0, x1, y1, ...]`` -> its tokens."""
        values = [float(v) for v in values]
        if len(values) % 2 or not values:
            raise ValueError(f"an instance needs x, y pairs, got {len(values)} values")
        out = []
        for x, y in zip(values[0::2], values[1::2]):
            (i, dx), (j, dy) = self._token(x, width), self._token(y, height)
            out.append(f"<grid{i}_{j}>" + (f"<OFF{dx}_{dy}>" if self.offsets else ""))
        return "".join(out)

    def read(self, raw) -> tuple[float, ...]:
        """One instance's tokens -> its points in cells; raises ``ValueError`` (unreadable) or
        :class:`rlsys.lang.format.Deleted` (withdrawn)."""
        pts, deleted = self._read_points(raw)
        n = len(pts) // 2 + deleted
        if deleted and (n < 3 or len(pts) < 6):
            raise Deleted(f"instance withdrawn with {deleted} <DELETE>")
        return pts

    def read_mask(self, raw) -> tuple[float, ...]:
        """One mask instance's tokens -> its set of points in cells: withdrawn points leave the
        set, and a set of only withdrawn points raises :class:`rlsys.lang.format.Deleted`."""
        pts, deleted = self._read_points(raw)
        if not pts:
            raise Deleted(f"mask withdrawn with {deleted} <DELETE>")
        return pts

    def _read_points(self, raw) -> tuple[tuple[float, ...], int]:
        """``(points in cells, withdrawn count)`` of one instance; ``ValueError`` if unreadable
        or empty."""
        if not isinstance(raw, str):
            raise ValueError(f"instance {str(raw)[:40]!r} is not text")
        pos, pts, deleted = 0, [], 0
        raw = raw.rstrip()
        while pos < len(raw):
            m = _POINT.match(raw, pos)
            if m is None:
                raise ValueError(f"instance {raw[:40]!r} is not a run of grid tokens")
            pos = m.end()
            i, j = int(m.group(1)), int(m.group(2))
            if i >= self.grid or j >= self.grid:
                raise ValueError(f"grid token <grid{i}_{j}> outside the {self.grid}x{self.grid} grid")
            if m.group(5):
                deleted += 1
                continue
            dx, dy = (int(m.group(3)), int(m.group(4))) if m.group(3) is not None else (0, 0)
            if abs(dx) > 1 or abs(dy) > 1:
                raise ValueError(f"offset <OFF{dx}_{dy}> is not one of the nine (-1..1 each way)")
            pts += [i + 0.5 + dx / 3, j + 0.5 + dy / 3]
        if not pts and not deleted:
            raise ValueError("empty instance")
        return tuple(pts), deleted

    def _pixels(self, c, width, height) -> tuple[float, ...]:
        # size * v / grid, in the order rewards.mask.grid_centres computes a cell centre
        # ((i + 0.5) * size / grid): a grid centre read back is then the very float the mask
        # conversion tested against the mask. v / grid * size can land an ulp short of a centre
        # that lies on a pixel border (78 px, grid 13: 7.5 / 13 * 78 = 44.999..., pixel 44, not 45).
        return tuple(v * (width if k % 2 == 0 else height) / self.grid for k, v in enumerate(c))

    def render(self, preds, width: int, height: int) -> str:
        out = []
        for p in preds:
            if p.kind != "none":
                for c in p.coords:
                    try:
                        check_kind(c, p.kind)  # a mask: any number of points
                    except ValueError as exc:
                        raise ValueError(f"phrase {p.phrase!r}: {exc}") from None
            # boxes left to right, then top to bottom (ordered by their tokens, as the bins are)
            key = lambda c: (self._token(float(c[0]), width), self._token(float(c[1]), height))
            out.append(p if p.kind == "none" else Prediction(p.phrase, p.kind, tuple(sorted(p.coords, key=key))))
        return render_markup(out, lambda c: self.write(c, width, height))

    def parse(self, text, width: int, height: int) -> Parsed:
        b = parse_bins(text, self.read)
        preds = [Prediction(p.phrase, p.kind, tuple(self._pixels(c, width, height) for c in p.coords)) for p in b]
        # a withdrawn instance still is an answer: text with only withdrawn points is not empty
        answered = bool(b) or bool(isinstance(text, str) and DELETE in text and not b.unreadable)
        return _parsed(preds, b.unreadable, b.errors, answered, [c for p in b for c in p.coords])

    def parse_masks(self, text, width: int, height: int) -> Parsed:
        """An answer to a mask question: every instance a set of points (kind ``"mask"``, flat
        ``(x0, y0, x1, y1, ...)`` in pixels). Never raises, as :meth:`parse`."""
        b = parse_bins(text, self.read_mask, kind="mask")
        preds = [Prediction(p.phrase, p.kind, tuple(self._pixels(c, width, height) for c in p.coords)) for p in b]
        answered = bool(b) or bool(isinstance(text, str) and DELETE in text and not b.unreadable)
        return _parsed(preds, b.unreadable, b.errors, answered, [c for p in b for c in p.coords])

    def render_keypoints(self, instances, width: int, height: int) -> str:
        return render_keypoint_bins(instances, lambda c: self.write(c, width, height))

    def parse_keypoints(self, text, width: int, height: int) -> tuple[list[KeypointInstance], int]:
        insts, bad = parse_keypoint_bins(text, self.read, _GETOK_RUN)

        def px(c):
            return self._pixels(c, width, height)

        return _Instances.in_pixels(insts, px), bad

    def prompt_boxes(self, boxes, width: int, height: int, floor: bool = False) -> str:
        """``"<grid1_12><OFF0_1><grid10_18><OFF-1_0>", ...`` (quoted, as the bins' are)."""
        return ", ".join(f'"{self.write(b, width, height)}"' for b in boxes)

    def question_hint(self, output: str) -> str:
        return ""


def tokenizer_grid(tokenizer) -> int:
    """The GETok grid size of a tokenizer: n when it holds all of :func:`getok_tokens` (n)."""
    found = [
        _GRID_TOKEN.fullmatch(t) for t in (tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else tokenizer)
    ]
    cells = {(int(m.group(1)), int(m.group(2))) for m in found if m}
    n = math.isqrt(len(cells))
    if not cells or n * n != len(cells) or cells != {(x, y) for x in range(n) for y in range(n)}:
        raise ValueError(
            f"the tokenizer holds no complete GETok grid ({len(cells)} <gridX_Y> tokens); prepare the "
            "checkpoint with model.vocabulary=getok (rlsys.data.prepare adds them)"
        )
    return n
