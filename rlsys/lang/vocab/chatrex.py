"""ChatRex's indices ``<objK>`` into candidate boxes listed in the question."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, replace

from rewards.geometry import box_iou
from rlsys.lang import coords
from rlsys.lang.format import (
    IM_END,
    KeypointInstance,
    Parsed,
    Prediction,
    render_instance,
)
from rlsys.lang.format import (
    parse as parse_bins,
)
from rlsys.lang.format import (
    render as render_markup,
)
from rlsys.lang.vocab.base import _Instances, _parsed, _refuse_masks, _unread_masks
from rlsys.lang.vocab.rex_bins import REX_BINS

# ---------------------------------------------------------------------------------------------
_OBJ = re.compile(r"\s*<obj(\d+)>\s*")
_OBJ_RUN = re.compile(r"(<obj\d+>)(?=\s*<obj\d+>)")
# An answer that ends on an index token was cut after it: <objK> is one token, so it is whole and
# is kept (a "," closes it); the cut itself still counts 1 unreadable (rlsys.lang.format.parse).
_OBJ_AT_END = re.compile(r"(<obj\d+>)(\s*)\Z")


def chatrex_tokens(max_proposals: int) -> tuple[str, ...]:
    """ChatRex's index tokens ``<obj0>``..``<obj{K-1}>``."""
    return tuple(f"<obj{i}>" for i in range(max_proposals))


def synthetic_proposals(sample, distractors: int = 5, jitter: float = 0.1, min_iou: float = 0.7) -> tuple:
    """A stand-in proposal network for synthetic data: each GT box moved by up to ``jitter`` of
    its sides (redrawn until its IoU with the GT is at least ``min_iou``), plus ``distractors``
    random boxes, shuffled so an index says nothing about which is right. A pure function of the
    sample's id, so SFT, GRPO, eval and the rewards all see the same proposals."""
    rng = random.Random(f"chatrex-proposals-{sample.id}")
    W, H = sample.width, sample.height
    out = []
    for inst in sample.instances:
        if inst.box is None:
            continue
        gt = tuple(float(v) for v in inst.box)
        bw, bh = gt[2] - gt[0], gt[3] - gt[1]
        best = gt
        for _ in range(20):
            c = (
                max(0.0, gt[0] + rng.uniform(-jitter, jitter) * bw),
                max(0.0, gt[1] + rng.uniform(-jitter, jitter) * bh),
                min(float(W), gt[2] + rng.uniform(-jitter, jitter) * bw),
                min(float(H), gt[3] + rng.uniform(-jitter, jitter) * bh),
            )
            if c[2] > c[0] and c[3] > c[1] and float(box_iou([c], [gt])[0, 0]) >= min_iou:
                best = c
                break
        out.append(tuple(round(v, 1) for v in best))
    for _ in range(distractors):
        w, h = rng.uniform(0.05, 0.5) * W, rng.uniform(0.05, 0.5) * H
        x0, y0 = rng.uniform(0, W - w), rng.uniform(0, H - h)
        out.append(tuple(round(v, 1) for v in (x0, y0, x0 + w, y0 + h)))
    rng.shuffle(out)
    return tuple(out)


@dataclass(frozen=True)
class ChatRex:
    """ChatRex's detection as retrieval (``chatrex``, section 3): candidate boxes are listed in
    the question with their index tokens, and the model answers with indices,
    ``<|object_ref_start|>cat<|object_ref_end|><|box_start|><obj3><obj7><|box_end|>``; it never
    writes a coordinate. ChatRex's own markup (``<g>cat</g><o><obj3><obj7></o>``) is replaced by
    rlsys's so one markup parser serves every vocabulary.

    The proposals belong to a sample, so this vocabulary is bound to one (:meth:`for_sample`,
    which every caller uses) before it renders or parses: they come from the sample's record
    (``proposals``, e.g. a proposal network's boxes merged in with ``python -m rlsys.data.proposals``),
    or, with ``proposal_source="synthetic"``, from :func:`synthetic_proposals` (GT jittered plus
    distractors; for synthetic data only: it leaks the GT's presence). The question lists them in
    the bins (``<obj0>: <12><40><100><200>``), so the model needs the coordinate tokens as well as
    ``<obj0>``..``<obj{K-1}>``; ChatRex feeds RoI features of each box instead, which needs an
    object encoder in the model. The reward is the box IoU F1 of the chosen proposals' boxes.
    Box outputs only (detection, referring, visual prompts, GUI boxes)."""

    max_proposals: int = 100
    proposal_source: str = "record"
    distractors: int = 5
    proposals: tuple | None = None
    size: tuple | None = None  # (width, height) of the bound image: the question lists the boxes in bins
    name: str = "chatrex"

    def __post_init__(self):
        if not 1 <= self.max_proposals <= 1000:
            raise ValueError(f"chatrex max_proposals must be 1..1000, got {self.max_proposals}")
        if self.proposal_source not in ("record", "synthetic"):
            raise ValueError(f"chatrex proposal_source must be 'record' or 'synthetic', got {self.proposal_source!r}")

    def added_tokens(self) -> tuple[str, ...]:
        return coords.COORD_TOKENS + chatrex_tokens(self.max_proposals)

    def for_proposals(self, boxes, width: int, height: int) -> "ChatRex":
        boxes = tuple(tuple(float(v) for v in b) for b in boxes)
        if not boxes:
            raise ValueError("chatrex needs at least one proposal box to answer with")
        if len(boxes) > self.max_proposals:
            raise ValueError(
                f"{len(boxes)} proposals, more than the {self.max_proposals} index tokens (model.chatrex_max_proposals)"
            )
        if any(len(b) != 4 or not (0 <= b[0] < b[2] <= width and 0 <= b[1] < b[3] <= height) for b in boxes):
            bad = next(
                b for b in boxes if len(b) != 4 or not (0 <= b[0] < b[2] <= width and 0 <= b[1] < b[3] <= height)
            )
            raise ValueError(f"proposal {list(bad)} is not an [x0, y0, x1, y1] box inside the {width}x{height} image")
        return replace(self, proposals=boxes, size=(int(width), int(height)))

    def for_sample(self, sample) -> "ChatRex":
        where = f"sample {sample.id!r} ({getattr(sample, 'source', '<memory>')})"
        if sample.output != "box":
            raise ValueError(
                f"{where}: chatrex answers with proposal indices, so boxes only; output is {sample.output!r} "
                "(set data.tasks to box tasks)"
            )
        props = list(getattr(sample, "proposals", None) or [])
        if not props:
            if self.proposal_source != "synthetic":
                raise ValueError(
                    f"{where}: no proposals (add a 'proposals' list of boxes to its record, e.g. with "
                    "python -m rlsys.data.proposals; model.chatrex_proposals=synthetic makes them from the GT, "
                    "for synthetic data only)"
                )
            props = synthetic_proposals(sample, self.distractors)
        try:
            return self.for_proposals(props, sample.width, sample.height)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None

    def _props(self) -> tuple:
        if self.proposals is None:
            raise ValueError("chatrex: bind the vocabulary to a sample's proposals first (for_sample)")
        return self.proposals

    def index_of(self, box) -> int:
        """The proposal that stands for a GT ``box``: the one of largest IoU, at least 0.5."""
        props = self._props()
        ious = box_iou([box], props)[0].tolist()
        k = max(range(len(props)), key=ious.__getitem__)
        if ious[k] < 0.5:
            raise ValueError(
                f"box {tuple(box)} has no proposal with IoU >= 0.5 (best {ious[k]:.2f}): the answer cannot name it"
            )
        return k

    def render(self, preds, width: int, height: int) -> str:
        self._props()
        _refuse_masks(self.name, preds)
        for p in preds:
            if p.kind not in ("box", "none"):
                raise ValueError(f"phrase {p.phrase!r}: chatrex answers boxes only, not {p.kind}")
        # instances by proposal index, written back to back as ChatRex writes them
        out = [
            p if p.kind == "none" else Prediction(p.phrase, p.kind, tuple(sorted(p.coords, key=self.index_of)))
            for p in preds
        ]
        return render_markup(out, lambda c: f"<obj{self.index_of(c)}>").replace(">,<obj", "><obj")

    def read(self, raw) -> tuple[float, ...]:
        m = _OBJ.fullmatch(raw) if isinstance(raw, str) else None
        if m is None:
            raise ValueError(f"instance {str(raw)[:40]!r} is not one <objK> token")
        k = int(m.group(1))
        props = self._props()
        if k >= len(props):
            raise ValueError(f"<obj{k}> names no proposal (there are {len(props)})")
        return tuple(props[k])

    def parse(self, text, width: int, height: int) -> Parsed:
        if self.proposals is None:
            return _parsed([], 1, ["chatrex: no proposals bound to read indices against"], False, [])
        if isinstance(text, str):
            text = _OBJ_RUN.sub(r"\1,", text)  # <obj1><obj5> -> one instance each
            text = _OBJ_AT_END.sub(r"\1,\2", text.split(IM_END, 1)[0])
        b = parse_bins(text, self.read)
        written = [(self.proposals.index(c),) for p in b for c in p.coords]
        return _parsed(list(b), b.unreadable, b.errors, bool(b), written)

    def parse_masks(self, text, width: int, height: int) -> Parsed:
        return _unread_masks(self.name)

    def render_keypoints(self, instances, width: int, height: int) -> str:
        raise ValueError("chatrex answers boxes only, not keypoints")

    def parse_keypoints(self, text, width: int, height: int) -> tuple[list[KeypointInstance], int]:
        return _Instances(), 1

    def prompt_boxes(self, boxes, width: int, height: int, floor: bool = False) -> str:
        return REX_BINS.prompt_boxes(boxes, width, height, floor)

    def question_hint(self, output: str) -> str:
        if self.proposals is None:
            return ""
        listed = ", ".join(
            f"<obj{k}>: {render_instance(tuple(int(v) for v in coords.encode_xy(b, *self.size)))}"
            for k, b in enumerate(self.proposals)
        )
        return f" Candidate boxes: {listed}. Answer with their indices."


def tokenizer_proposals(tokenizer) -> int:
    """How many ChatRex index tokens a tokenizer holds: K when it has ``<obj0>``..``<obj{K-1}>``."""
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else tokenizer
    k = 0
    while f"<obj{k}>" in vocab:
        k += 1
    if k == 0:
        raise ValueError(
            "the tokenizer holds no ChatRex index tokens <obj0>..; prepare the checkpoint with "
            "model.vocabulary=chatrex (rlsys.data.prepare adds them)"
        )
    return k
