"""Rex-Omni's 1,000 quantised bins ``<0>``..``<999>`` (the default vocabulary)."""

from __future__ import annotations

from dataclasses import dataclass

from rlsys.lang import coords
from rlsys.lang.format import (
    KeypointInstance,
    Parsed,
    Prediction,
    render_instance,
    sort_boxes,
)
from rlsys.lang.format import (
    parse as parse_bins,
)
from rlsys.lang.format import (
    parse_keypoints as parse_keypoint_bins,
)
from rlsys.lang.format import (
    render as render_bins,
)
from rlsys.lang.format import (
    render_keypoints as render_keypoint_bins,
)
from rlsys.lang.vocab.base import _Instances, _parsed, _refuse_masks, _unread_masks


# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RexBins:
    """Rex-Omni's coordinate bins (see :mod:`rlsys.lang.format` and :mod:`rlsys.lang.coords`)."""

    name: str = "rex_bins"

    def for_sample(self, sample):
        return self  # nothing per sample: the answer's geometry is self-contained

    def for_proposals(self, boxes, width: int, height: int):
        return self

    def added_tokens(self) -> tuple[str, ...]:
        return coords.COORD_TOKENS

    def _bins(self, c, width, height, floor: bool = False) -> tuple[int, ...]:
        return tuple(int(b) for b in coords.encode_xy(c, width, height, floor))

    def render(self, preds, width: int, height: int) -> str:
        _refuse_masks(self.name, preds)
        out = []
        for p in preds:
            if p.kind == "none":
                out.append(p)
                continue
            # boxes sorted by x0 then y0 in bins, as the paper's targets are (section 2.3)
            out.append(Prediction(p.phrase, p.kind, sort_boxes(self._bins(c, width, height) for c in p.coords)))
        return render_bins(out)

    def parse(self, text, width: int, height: int) -> Parsed:
        b = parse_bins(text)
        preds = [
            Prediction(
                p.phrase, p.kind, tuple(tuple(float(v) for v in coords.decode_xy(c, width, height)) for c in p.coords)
            )
            for p in b
        ]
        return _parsed(preds, b.unreadable, b.errors, bool(b), [c for p in b for c in p.coords])

    def parse_masks(self, text, width: int, height: int) -> Parsed:
        return _unread_masks(self.name)

    def render_keypoints(self, instances, width: int, height: int) -> str:
        return render_keypoint_bins(
            [
                KeypointInstance(
                    i.name,
                    self._bins(i.box, width, height),
                    {k: None if v is None else self._bins(v, width, height) for k, v in i.keypoints.items()},
                )
                for i in instances
            ]
        )

    def parse_keypoints(self, text, width: int, height: int) -> tuple[list[KeypointInstance], int]:
        insts, bad = parse_keypoint_bins(text)

        def px(c):
            return tuple(float(v) for v in coords.decode_xy(c, width, height))

        return _Instances.in_pixels(insts, px), bad

    def prompt_boxes(self, boxes, width: int, height: int, floor: bool = False) -> str:
        """``"<12><412><339><568>", ...`` (quoted coordinate-token strings; ``floor``: bins by floor)."""
        return ", ".join(f'"{render_instance(self._bins(b, width, height, floor))}"' for b in boxes)

    def question_hint(self, output: str) -> str:
        return ""


REX_BINS = RexBins()
