"""What a detection request may be, and what its answer becomes: the request schema, its checks
(pure functions; :class:`RequestError` carries the HTTP status), the image loader with its limits,
the question asked of the model and the answer read back into objects."""

import base64
import binascii
import io
import logging
import math
import re
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from rewards.mask import grid_cell_masks
from rlsys.config import LimitsConfig
from rlsys.lang.format import _check_phrase as check_output_phrase
from rlsys.lang.format import find_control_token
from rlsys.lang.prompts import build_question
from rlsys.lang.vocab import REX_BINS, check_writes_masks

log = logging.getLogger("rlsys.serve")


# ---------------------------------------------------------------------------------------------
# Requests: schema and validation (pure functions; RequestError carries the HTTP status)
# ---------------------------------------------------------------------------------------------
class RequestError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


TASKS = ("detection", "referring", "pointing", "visual_prompt", "ocr", "gui", "keypoint")


class DetectRequest(BaseModel):
    """The body of ``POST /v1/detect``. Unknown fields are rejected, not ignored: a misspelt
    ``categorie`` would otherwise silently detect nothing."""

    model_config = ConfigDict(extra="forbid")
    image: str = Field(
        description="Base64 PNG or JPEG (a data: URI prefix is accepted); an http(s) URL only if the server allows it."
    )
    task: Literal["detection", "referring", "pointing", "visual_prompt", "ocr", "gui", "keypoint"]
    categories: list[str] | None = Field(
        None, description="Phrases to find (detection, pointing, keypoint; optional for ocr)."
    )
    expression: str | None = Field(
        None, description="The referring expression or GUI element description (referring, gui)."
    )
    prompt_boxes: list[list[float]] | None = Field(
        None, description="Example boxes [x0, y0, x1, y1] in image pixels (visual_prompt)."
    )
    output: Literal["box", "point", "polygon", "keypoint", "mask"] | None = Field(
        None,
        description="Answer geometry; default per task. 'mask' (detection, referring) needs a model that writes masks (vocabulary getok).",
    )
    keypoint_names: list[str] | None = Field(
        None, description="Keypoints to locate (keypoint; default: the model's own)."
    )
    proposals: list[list[float]] | None = Field(
        None,
        description="Candidate boxes [x0, y0, x1, y1] in image pixels, for a model trained with vocabulary chatrex (which answers with their indices); required there, refused otherwise.",
    )


# task -> (required field, optional fields, allowed outputs with the default first)
TASK_RULES: dict[str, tuple[str | None, tuple[str, ...], tuple[str, ...]]] = {
    "detection": ("categories", (), ("box", "point", "mask")),
    "pointing": ("categories", (), ("point",)),
    "referring": ("expression", (), ("box", "point", "mask")),
    "gui": ("expression", (), ("point", "box")),
    "visual_prompt": ("prompt_boxes", (), ("box",)),
    "ocr": (None, ("categories",), ("box", "polygon")),
    "keypoint": ("categories", ("keypoint_names",), ("keypoint",)),
}
_TASK_FIELDS = ("categories", "expression", "prompt_boxes", "keypoint_names")


def _pydantic_message(exc: ValidationError) -> str:
    parts = []
    for e in exc.errors():
        loc = ".".join(str(x) for x in e["loc"])
        if e["type"] == "missing":
            parts.append(f"missing field '{loc}'")
        elif e["type"] == "extra_forbidden":
            parts.append(f"unknown field '{loc}' (fields: {', '.join(DetectRequest.model_fields)})")
        else:
            parts.append(f"field '{loc}': {e['msg']}")
    return "; ".join(parts)


def parse_request(body: bytes) -> DetectRequest:
    """JSON body -> :class:`DetectRequest`: 400 for malformed JSON, 422 for a wrong shape."""
    import json

    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestError(400, f"malformed JSON body: {exc}") from None
    except RecursionError:  # the parser recurses per nesting level ("[[[[..." a few thousand deep)
        raise RequestError(400, "malformed JSON body: nested too deeply") from None
    if not isinstance(obj, dict):
        raise RequestError(422, f"the body must be a JSON object, got {type(obj).__name__}")
    try:
        return DetectRequest.model_validate(obj)
    except ValidationError as exc:
        raise RequestError(422, _pydantic_message(exc)) from None


def _check_phrase(what: str, phrase: str, limits: LimitsConfig, control: frozenset[str] = frozenset()) -> str:

    phrase = phrase.strip()
    if not phrase:
        raise RequestError(422, f"{what} is empty")
    if len(phrase) > limits.max_phrase_chars:
        raise RequestError(422, f"{what} has {len(phrase)} characters, over the limit of {limits.max_phrase_chars}")
    tok = find_control_token(phrase, control)  # the checkpoint tokenizer's own control tokens
    if tok is not None:
        raise RequestError(422, f"{what} contains the tokenizer's control token {tok}: phrases are plain text")
    try:  # the output language's rules: no special or coordinate tokens smuggled into the prompt
        check_output_phrase(phrase)
    except ValueError as exc:
        raise RequestError(422, f"{what}: {exc}") from None
    return phrase


def check_request(
    req: DetectRequest, limits: LimitsConfig, control: frozenset[str] = frozenset()
) -> tuple[str, list[str]]:
    """Task-specific rules that need no image. Returns ``(output, phrases)`` for the prompt.
    ``control``: the tokenizer's control tokens (:func:`rlsys.lang.format.control_tokens`), refused in
    every phrase."""
    required, optional, outputs = TASK_RULES[req.task]
    given = {f for f in _TASK_FIELDS if getattr(req, f) is not None}
    if required and required not in given:
        raise RequestError(422, f"task '{req.task}' needs field '{required}'")
    extra = given - {required, *optional}
    if extra:
        raise RequestError(422, f"field(s) {', '.join(sorted(extra))} do not apply to task '{req.task}'")
    output = req.output or outputs[0]
    if output not in outputs:
        raise RequestError(
            422, f"output '{output}' is not available for task '{req.task}' (choose: {', '.join(outputs)})"
        )
    phrases: list[str] = []
    if req.categories is not None:
        if not req.categories:
            raise RequestError(422, "categories is empty")
        if len(req.categories) > limits.max_categories:
            raise RequestError(422, f"too many categories: {len(req.categories)}, the limit is {limits.max_categories}")
        phrases = [_check_phrase(f"categories[{i}]", c, limits, control) for i, c in enumerate(req.categories)]
    if req.expression is not None:
        phrases = [_check_phrase("expression", req.expression, limits, control)]
    for i, k in enumerate(req.keypoint_names or ()):
        _check_phrase(f"keypoint_names[{i}]", k, limits, control)
    if req.prompt_boxes is not None:
        if not req.prompt_boxes:
            raise RequestError(422, "prompt_boxes is empty")
        if len(req.prompt_boxes) > limits.max_prompt_boxes:
            raise RequestError(
                422, f"too many prompt_boxes: {len(req.prompt_boxes)}, the limit is {limits.max_prompt_boxes}"
            )
        for i, b in enumerate(req.prompt_boxes):
            if len(b) != 4 or not all(math.isfinite(v) for v in b):
                raise RequestError(422, f"prompt_boxes[{i}] must be 4 finite numbers [x0, y0, x1, y1], got {b}")
            if not (b[0] < b[2] and b[1] < b[3]):
                raise RequestError(422, f"prompt_boxes[{i}] {b} is empty or inverted (need x0 < x1 and y0 < y1)")
    return output, phrases


def check_boxes_inside(req: DetectRequest, width: int, height: int) -> None:
    for i, (x0, y0, x1, y1) in enumerate(req.prompt_boxes or ()):
        if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
            raise RequestError(422, f"prompt_boxes[{i}] {[x0, y0, x1, y1]} lies outside the {width}x{height} image")


_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
_DATA_URI = re.compile(r"^data:image/[A-Za-z0-9.+\-]+;base64,", re.IGNORECASE)
# the Qwen2.5-VL processor rejects more extreme aspect ratios (smart_resize)
MAX_ASPECT_RATIO = 200
IMAGE_FORMATS = ("PNG", "JPEG")


def _fetch_url(url: str, limits: LimitsConfig) -> bytes:
    import urllib.error
    import urllib.request

    class HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, req, fp, code, msg, headers, newurl):
            if not newurl.lower().startswith(("http://", "https://")):
                raise RequestError(400, f"image URL redirects to a non-http(s) address: {newurl[:200]}")
            return super().redirect_request(req, fp, code, msg, headers, newurl)

    # Only http(s) handlers: no file://, ftp:// or data: through this opener.
    opener = urllib.request.OpenerDirector()
    for h in (
        urllib.request.HTTPHandler(),
        urllib.request.HTTPSHandler(),
        HttpOnlyRedirects(),
        urllib.request.HTTPErrorProcessor(),
        urllib.request.HTTPDefaultErrorHandler(),
    ):
        opener.add_handler(h)
    try:
        with opener.open(url, timeout=limits.url_fetch_timeout_s) as r:
            data = r.read(limits.max_image_bytes + 1)
    except RequestError:
        raise
    except urllib.error.HTTPError as exc:
        raise RequestError(400, f"image URL answered HTTP {exc.code}") from None
    except Exception as exc:  # DNS, refused, timeout, TLS: all the caller's URL
        raise RequestError(400, f"could not fetch the image URL: {exc}") from None
    if len(data) > limits.max_image_bytes:
        raise RequestError(413, f"image at the URL is over the limit of {limits.max_image_bytes} bytes")
    return data


def load_image(spec: str, limits: LimitsConfig):
    """The request's ``image`` field -> an RGB PIL image, or a :class:`RequestError`."""
    from PIL import Image, UnidentifiedImageError

    spec = spec.strip()
    if _URL.match(spec):
        scheme = spec.split("://", 1)[0].lower()
        if not limits.allow_url_fetch:
            raise RequestError(
                400,
                "image is a URL, and this server does not fetch URLs (limits.allow_url_fetch is off): send the image bytes as base64",
            )
        if scheme not in ("http", "https"):
            raise RequestError(400, f"image URL scheme '{scheme}' is not allowed (only http and https)")
        data = _fetch_url(spec, limits)
    else:
        spec = re.sub(r"\s+", "", _DATA_URI.sub("", spec, count=1))  # line-wrapped base64 is common
        # refuse before decoding: base64 of max_image_bytes is at most 4/3 as long (+ padding)
        if len(spec) > 4 * math.ceil(limits.max_image_bytes / 3):
            raise RequestError(413, f"image is over the limit of {limits.max_image_bytes} bytes")
        try:
            data = base64.b64decode(spec, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise RequestError(400, f"image is not valid base64 ({exc})") from None
        if not data:
            raise RequestError(400, "image is empty")
        if len(data) > limits.max_image_bytes:
            raise RequestError(413, f"image is {len(data)} bytes, over the limit of {limits.max_image_bytes}")
    try:
        # formats=: only the decoders we mean to expose to the network
        im = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except Image.DecompressionBombError as exc:
        raise RequestError(413, f"image has too many pixels ({exc})") from None
    except (UnidentifiedImageError, OSError, ValueError):
        raise RequestError(400, f"image is not a {' or '.join(IMAGE_FORMATS)} image") from None
    w, h = im.size
    if w * h > limits.max_image_pixels:  # checked from the header, before decoding the pixels
        raise RequestError(413, f"image is {w}x{h} = {w * h} pixels, over the limit of {limits.max_image_pixels}")
    if max(w, h) > MAX_ASPECT_RATIO * min(w, h):
        raise RequestError(422, f"image is {w}x{h}: aspect ratio over {MAX_ASPECT_RATIO}")
    try:
        return im.convert("RGB")
    except Exception as exc:  # truncated or corrupt pixel data
        raise RequestError(400, f"image could not be decoded ({exc})") from None


def bind_vocabulary(req: DetectRequest, output: str, width: int, height: int, vocabulary):
    """The vocabulary that reads this request's answer: for chatrex, bound to the request's
    proposals (checked: given, boxes inside the image, no more than its index tokens); others as
    they are; a mask request only for a vocabulary that writes masks. The request body's byte
    limit bounds the list's length."""
    if output == "mask":
        try:
            check_writes_masks(vocabulary or REX_BINS)
        except ValueError as exc:
            raise RequestError(422, f"output 'mask': this model cannot answer it ({exc})") from None
    if vocabulary is None or vocabulary.name != "chatrex":
        if req.proposals is not None:
            raise RequestError(422, "field 'proposals' applies only to a model trained with vocabulary chatrex")
        return vocabulary
    if req.proposals is None:
        raise RequestError(
            422, "this model answers with proposal indices (vocabulary chatrex): the request needs 'proposals'"
        )
    if output != "box":
        raise RequestError(422, f"a chatrex model answers boxes (proposal indices), not output '{output}'")
    for i, b in enumerate(req.proposals):
        if len(b) != 4 or not all(math.isfinite(v) for v in b):
            raise RequestError(422, f"proposals[{i}] must be 4 finite numbers [x0, y0, x1, y1], got {b}")
    try:
        return vocabulary.for_proposals(req.proposals, width, height)
    except ValueError as exc:
        raise RequestError(422, f"proposals: {exc}") from None


def question_for(
    req: DetectRequest,
    output: str,
    phrases: list[str],
    width: int,
    height: int,
    vocabulary=None,
    prompt_set: str = "paper",
) -> str:

    if req.task == "ocr" and not phrases:
        phrases = ["text"]
    return build_question(
        req.task,
        output,
        phrases,
        width=width,
        height=height,
        prompt_boxes=req.prompt_boxes or (),
        keypoint_names=req.keypoint_names or (),
        vocabulary=vocabulary or REX_BINS,
        prompt_set=prompt_set,
    )


@dataclass(frozen=True)
class Prepared:
    """A request that passed every check: what the engine is asked and how its answer is read."""

    request: DetectRequest
    output: str
    image: object  # the RGB PIL image
    vocabulary: object  # the vocabulary that reads the answer (bound to the request's proposals for chatrex)
    question: str


def prepare_request(
    body: bytes,
    limits: LimitsConfig,
    control: frozenset[str] = frozenset(),
    vocabulary=None,
    prompt_set: str = "paper",
) -> Prepared | RequestError:
    """A request body -> :class:`Prepared`, or the :class:`RequestError` the app answers with:
    every check the app makes before the engine, in its order, as one function (the app calls
    it, and the fuzz test calls it in-process on thousands of bodies). A check that raised
    instead of refusing is still the client's input: a 400 naming the exception, logged."""
    if len(body) > limits.max_request_bytes:  # what read_body refuses from the header
        return body_over_limit(len(body), limits.max_request_bytes)
    try:
        req = parse_request(body)
        output, phrases = check_request(req, limits, control)
        image = load_image(req.image, limits)
        w, h = image.size
        check_boxes_inside(req, w, h)
        bound = bind_vocabulary(req, output, w, h, vocabulary)
        question = question_for(req, output, phrases, w, h, bound, prompt_set)
    except RequestError as exc:
        return exc
    except Exception as exc:
        log.exception("request validation raised instead of refusing")
        return RequestError(400, f"the request could not be read: {type(exc).__name__}: {exc}")
    return Prepared(request=req, output=output, image=image, vocabulary=bound, question=question)


def _px(c) -> list[float]:
    return [round(float(v), 2) for v in c]


def to_objects(
    text: str, task: str, width: int, height: int, vocabulary=None, output: str | None = None
) -> tuple[list[dict], int]:
    """Model text -> objects in the request image's pixels, and how much could not be read
    (``vocabulary``: the one the model answers in; default the bins). A mask answer
    (``output="mask"``) gives each instance its points and the mask they decode to: COCO RLE
    (``pycocotools.mask.decode`` reads it) of the union of the points' grid cells, the SAM-free
    decoder; the points are also SAM's prompts for an outline (``rewards.sam.SamMaskSource``)."""

    vocabulary = vocabulary or REX_BINS
    if output == "mask":
        return _mask_objects(vocabulary.parse_masks(text, width, height), vocabulary.grid, width, height)
    if task == "keypoint":
        insts, bad = vocabulary.parse_keypoints(text, width, height)
        return [
            {
                "phrase": i.name,
                "box": _px(i.box),
                "keypoints": {k: (_px(v) if v is not None else None) for k, v in i.keypoints.items()},
            }
            for i in insts
        ], bad
    parsed = vocabulary.parse(text, width, height)
    objects = [{"phrase": p.phrase, p.kind: _px(c)} for p in parsed for c in p.coords]
    return objects, parsed.unreadable


def _mask_objects(parsed, grid: int, width: int, height: int) -> tuple[list[dict], int]:
    import numpy as np
    from pycocotools import mask as mask_utils

    sets = [(p.phrase, c) for p in parsed for c in p.coords]
    masks = grid_cell_masks([c for _, c in sets], grid, height, width)
    objects = []
    for (phrase, c), m in zip(sets, masks):
        rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        objects.append(
            {
                "phrase": phrase,
                "points": [_px(c[i : i + 2]) for i in range(0, len(c), 2)],
                "mask": {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")},
                "mask_decoder": "grid_cells",
            }
        )
    return objects, parsed.unreadable


def body_over_limit(size: int, limit: int) -> RequestError:
    """The 413 for a body of ``size`` bytes past ``limit``: one wording for :func:`read_body` (from
    the Content-Length header) and :func:`prepare_request` (the body in hand)."""
    return RequestError(413, f"request body is {size} bytes, over the limit of {limit}")


async def read_body(request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes ``limit`` (no full buffering)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise RequestError(400, f"bad Content-Length header {declared!r}")
        if int(declared) > limit:
            raise body_over_limit(int(declared), limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"request body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
