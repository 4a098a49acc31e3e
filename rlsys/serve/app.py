"""Ray Serve deployment of a detector checkpoint: ``python -m rlsys.serve --checkpoint DIR``.

``POST /v1/detect`` takes ``{"image": base64 PNG/JPEG, "task": ..., "categories" | "expression" |
"prompt_boxes": ..., "output": ...}`` and answers ``{"objects": [...], "raw": model text,
"image_size": [w, h], "latency_ms": ..., "unreadable": n}`` with coordinates in the request
image's pixels (a mask answer: each mask's points and its grid-cell mask as COCO RLE). One replica holds one vLLM ``AsyncLLM`` engine, so concurrent requests share
vLLM's continuous batch; ``@serve.batch`` in front of it (``batching.enabled``) additionally
gathers requests arriving within ``batching.batch_wait_timeout_s`` and submits them together.
Replicas autoscale between ``deployment.min_replicas`` and ``deployment.max_replicas``.

Bad input is answered 400/413/422 with ``{"error": message}`` naming the problem; it never
reaches the engine. Validation is plain functions (no Ray, no FastAPI) so it is tested alone.
``serve run configs/serve_app.yaml`` uses :func:`app_builder`.
"""

# No `from __future__ import annotations` here: FastAPI reads the route's `request: Request`
# annotation at runtime, and Request is imported inside _detector_class (lazily).
import argparse
import asyncio
import base64
import binascii
import functools
import io
import logging
import math
import os
import re
import signal
import sys
import time
import uuid
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from rewards.mask import grid_cell_masks
from rlsys.config import (
    REPO_ROOT,
    ConfigError,
    KvCacheMiB,
    MaxPixels,
    MinPixels,
    describe,
    engine_memory,
    load_config,
    pixel_budget,
)
from rlsys.lang.format import _check_phrase as check_output_phrase
from rlsys.lang.format import control_tokens, find_control_token
from rlsys.lang.prompts import build_question, chat_prompt
from rlsys.lang.vocab import REX_BINS, check_writes_masks, vocabulary_for
from rlsys.models import ensure_tiny_model, processor_for

log = logging.getLogger("rlsys.serve")
DEFAULT_SERVE_CONFIG = REPO_ROOT / "configs" / "serve_tiny_cpu.yaml"


# ---------------------------------------------------------------------------------------------
# Config schema (values in configs/serve_*.yaml)
# ---------------------------------------------------------------------------------------------
class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ServeModelConfig(_Section):
    checkpoint: str | None = Field(
        None,
        description="Hugging Face checkpoint directory with coordinate tokens (a GRPO checkpoint's step_N/ works: its hf/ is used). None: build (once) the tiny random-weight model in model.tiny_model_dir.",
    )
    tiny_model_dir: str = Field(
        "runs/serve-tiny/tiny-model", description="Where the tiny model is built when model.checkpoint is None."
    )
    trust_remote_code: bool = Field(
        False,
        description="Allow a checkpoint's own Python code (off: the Qwen2.5-VL classes in transformers/vLLM suffice).",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Engine weight dtype (float32 on CPUs, bfloat16 on GPUs)."
    )
    vocabulary: Literal["rex_bins", "qwen_json", "getok", "chatrex"] = Field(
        "rex_bins",
        description="The vocabulary the checkpoint was trained to answer in (model.vocabulary of its SFT/GRPO config; rlsys.lang.vocab; getok reads its grid size from the checkpoint's tokenizer; chatrex needs the request's 'proposals'). Answers are returned in the request image's pixels whatever it is.",
    )
    min_pixels: MinPixels = None
    max_pixels: MaxPixels = None

    def pixel_budget(self) -> dict:
        return pixel_budget(self.min_pixels, self.max_pixels)


class EngineConfig(_Section):
    max_model_len_tokens: int = Field(
        1024, ge=64, description="vLLM context length: prompt (image tokens included) + answer."
    )
    max_num_seqs: int = Field(32, ge=1, le=4096, description="Sequences vLLM runs in one continuous batch per replica.")
    gpu_memory_utilization: float = Field(
        0.1,
        gt=0,
        le=0.95,
        description="vLLM's share of device memory (weights, activations, KV cache); on the CPU backend, of the RAM of the engine's NUMA node. Ignored for the KV cache when kv_cache_mib is set.",
    )
    kv_cache_mib: KvCacheMiB = None
    enforce_eager: bool = Field(
        True, description="Disable CUDA graphs / torch.compile (faster start; required on CPU)."
    )
    seed: int = Field(0, description="Engine seed (answers are greedy unless generation.temperature > 0).")


class GenerationConfig(_Section):
    max_new_tokens: int = Field(512, ge=1, le=32768, description="Answer length limit, in tokens.")
    temperature: float = Field(
        0.0, ge=0, le=2.0, description="Sampling temperature; 0 is greedy (same image, same answer)."
    )
    top_p: float = Field(1.0, gt=0, le=1.0, description="Nucleus sampling mass (with temperature > 0).")


class BatchingConfig(_Section):
    enabled: bool = Field(
        True,
        description="Serve dynamic batching (@serve.batch) in front of the engine; off: each request goes to the engine on its own.",
    )
    max_batch_size: int = Field(16, ge=1, le=1024, description="Most requests gathered into one batch.")
    batch_wait_timeout_s: float = Field(
        0.01, ge=0, le=10, description="How long the first request of a batch waits for others."
    )
    max_concurrent_batches: int = Field(
        8,
        ge=1,
        le=1024,
        description="Batches in the engine at once. A batch returns when its slowest answer is done, so with 1 (Serve's default) new requests wait for the whole batch and vLLM's continuous batching degrades to static batches.",
    )


class DeploymentConfig(_Section):
    name: str = Field("detector", min_length=1, description="Serve application and deployment name.")
    min_replicas: int = Field(
        1,
        ge=0,
        description="Autoscaling lower bound (0 scales to zero when idle; the next request waits for an engine start).",
    )
    max_replicas: int = Field(1, ge=1, description="Autoscaling upper bound; each replica holds one vLLM engine.")
    target_ongoing_requests: float = Field(8.0, gt=0, description="Autoscaling target: in-flight requests per replica.")
    max_ongoing_requests: int = Field(
        32, ge=1, description="Requests one replica accepts at once; more wait in the proxy."
    )
    cpus_per_replica: float = Field(1.0, ge=0, description="CPUs each replica requests from Ray.")
    gpus_per_replica: float = Field(0.0, ge=0, description="GPUs each replica requests from Ray (0 on CPU machines).")


class HttpConfig(_Section):
    host: str = Field(
        "127.0.0.1",
        description="Address the Serve proxy listens on (0.0.0.0 to accept other machines); python -m rlsys.serve only: serve run takes it from the Serve config file.",
    )
    port: int = Field(8000, ge=1, le=65535, description="Port of the Serve proxy (python -m rlsys.serve only).")
    route_prefix: str = Field("/", pattern=r"^/", description="Route prefix of the application.")


class LimitsConfig(_Section):
    max_image_bytes: int = Field(10 * 2**20, ge=1024, description="Largest encoded image accepted (413 above).")
    max_image_pixels: int = Field(
        4096 * 4096,
        ge=1,
        description="Largest width x height accepted (413 above); the processor resizes to the model's budget anyway.",
    )
    max_categories: int = Field(50, ge=1, description="Most categories in one request (422 above).")
    max_phrase_chars: int = Field(200, ge=1, description="Longest category or expression, in characters.")
    max_prompt_boxes: int = Field(16, ge=1, description="Most visual-prompt boxes in one request.")
    allow_url_fetch: bool = Field(
        False,
        description="Fetch an http(s) URL given as image. Off: a URL is answered 400. On, the server fetches any address it can reach (mind internal networks).",
    )
    url_fetch_timeout_s: float = Field(10.0, gt=0, description="Limit for fetching one image URL.")

    @property
    def max_request_bytes(self) -> int:
        """The body limit follows from the image limit: base64 grows 4/3, plus room for fields."""
        return math.ceil(self.max_image_bytes * 4 / 3) + 64 * 1024


class ServeConfig(_Section):
    model: ServeModelConfig = ServeModelConfig()
    engine: EngineConfig = EngineConfig()
    generation: GenerationConfig = GenerationConfig()
    batching: BatchingConfig = BatchingConfig()
    deployment: DeploymentConfig = DeploymentConfig()
    http: HttpConfig = HttpConfig()
    limits: LimitsConfig = LimitsConfig()

    @model_validator(mode="after")
    def _consistent(self):
        d = self.deployment
        if d.min_replicas > d.max_replicas:
            raise ValueError(
                f"deployment.min_replicas ({d.min_replicas}) exceeds deployment.max_replicas ({d.max_replicas})"
            )
        if self.batching.enabled and self.batching.max_batch_size > d.max_ongoing_requests:
            raise ValueError(
                f"batching.max_batch_size ({self.batching.max_batch_size}) exceeds deployment.max_ongoing_requests "
                f"({d.max_ongoing_requests}): a replica never holds enough requests to fill a batch"
            )
        if self.generation.max_new_tokens >= self.engine.max_model_len_tokens:
            raise ValueError(
                f"generation.max_new_tokens ({self.generation.max_new_tokens}) leaves no room for the prompt in "
                f"engine.max_model_len_tokens ({self.engine.max_model_len_tokens})"
            )
        return self


def _resolve(path: str | os.PathLike) -> Path:
    """Relative paths: the working directory first, then the repository root (``serve run``
    builds the application in a Ray worker whose working directory may differ)."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p.resolve()
    return (REPO_ROOT / p) if (REPO_ROOT / p).exists() else p.resolve()


def resolve_model_dir(cfg: ServeConfig) -> Path:
    """The checkpoint directory to serve; builds the tiny model when none is configured."""
    if cfg.model.checkpoint is None:
        return ensure_tiny_model(_resolve(cfg.model.tiny_model_dir)).resolve()
    p = _resolve(cfg.model.checkpoint)
    for cand in (p, p / "hf"):  # a GRPO checkpoint keeps its Hugging Face directory in hf/
        if (cand / "config.json").is_file():
            return cand
    raise ConfigError(f"model.checkpoint {p}: not a Hugging Face checkpoint directory (no config.json in it or in hf/)")


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


def question_for(req: DetectRequest, output: str, phrases: list[str], width: int, height: int, vocabulary=None) -> str:

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
    )


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


async def read_body(request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes ``limit`` (no full buffering)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise RequestError(400, f"bad Content-Length header {declared!r}")
        if int(declared) > limit:
            raise RequestError(413, f"request body is {declared} bytes, over the limit of {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"request body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


# ---------------------------------------------------------------------------------------------
# The deployment. Built on first use so that --help and config errors need no Ray import.
# ---------------------------------------------------------------------------------------------
@functools.cache
def _detector_class(max_concurrent_batches: int):
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from ray import serve

    api = FastAPI(title="rlsys detector", description=__doc__.split("\n\n")[0])

    def error(status: int, message: str):
        return JSONResponse({"error": message}, status_code=status)

    @serve.deployment
    @serve.ingress(api)
    class Detector:
        def __init__(self, cfg: dict, model_dir: str):
            # vLLM's engine core is a child process; fork inside a Ray worker is unsafe
            os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
            from vllm import AsyncEngineArgs, SamplingParams
            from vllm.sampling_params import RequestOutputKind
            from vllm.v1.engine.async_llm import AsyncLLM

            self.cfg = ServeConfig.model_validate(cfg)
            self.model_dir = model_dir
            e, g = self.cfg.engine, self.cfg.generation
            pixels = self.cfg.model.pixel_budget()
            self.processor = processor_for(self.cfg.model, model_dir)

            self.control = control_tokens(self.processor.tokenizer)
            self.vocabulary = vocabulary_for(self.cfg.model, self.processor)
            t0 = time.perf_counter()
            self.engine = AsyncLLM.from_engine_args(
                AsyncEngineArgs(
                    model=model_dir,
                    max_model_len=e.max_model_len_tokens,
                    max_num_seqs=e.max_num_seqs,
                    **engine_memory(e.gpu_memory_utilization, e.kv_cache_mib),
                    enforce_eager=e.enforce_eager,
                    seed=e.seed,
                    dtype=self.cfg.model.dtype,
                    limit_mm_per_prompt={"image": 1, "video": 0},
                    mm_processor_kwargs=pixels or None,
                    trust_remote_code=self.cfg.model.trust_remote_code,
                )
            )
            self.engine_start_s = time.perf_counter() - t0
            # special tokens kept: the output language is made of them. FINAL_ONLY: the answer is
            # returned whole, so the engine need not wake this coroutine (and build a cumulative
            # output) at every token of every request in the batch
            self.sampling = SamplingParams(
                max_tokens=g.max_new_tokens,
                temperature=g.temperature,
                top_p=g.top_p,
                skip_special_tokens=False,
                output_kind=RequestOutputKind.FINAL_ONLY,
            )
            b = self.cfg.batching
            self._generate_batch.set_max_batch_size(b.max_batch_size)
            self._generate_batch.set_batch_wait_timeout_s(b.batch_wait_timeout_s)

        async def check_health(self):
            # Serve calls this periodically; raising marks the replica unhealthy and replaces it
            await self.engine.check_health()

        def __del__(self):
            if getattr(self, "engine", None) is not None:
                self.engine.shutdown()

        async def _generate(self, prompt: str, image) -> str:
            out = None
            async for out in self.engine.generate(
                {"prompt": prompt, "multi_modal_data": {"image": image}}, self.sampling, uuid.uuid4().hex
            ):
                pass
            return out.outputs[0].text

        # size and wait are set from the config in __init__; this one has no setter
        @serve.batch(max_concurrent_batches=max_concurrent_batches)
        async def _generate_batch(self, items: list[tuple[str, object]]) -> list:
            # the whole batch enters vLLM's scheduler together; one failure stays with its request
            return await asyncio.gather(*(self._generate(p, im) for p, im in items), return_exceptions=True)

        @api.get("/v1/health")
        async def health(self):
            return {
                "status": "ok",
                "model": self.model_dir,
                "engine_start_s": round(self.engine_start_s, 2),
                "batching": self.cfg.batching.model_dump(),
                "max_new_tokens": self.cfg.generation.max_new_tokens,
            }

        @api.post("/v1/detect")
        async def detect(self, request: Request):
            from vllm.exceptions import VLLMClientError

            t0 = time.perf_counter()
            limits = self.cfg.limits
            try:
                req = parse_request(await read_body(request, limits.max_request_bytes))
                output, phrases = check_request(req, limits, self.control)
                image = await asyncio.to_thread(load_image, req.image, limits)  # decode/fetch off the event loop
                w, h = image.size
                check_boxes_inside(req, w, h)
                vocabulary = bind_vocabulary(req, output, w, h, self.vocabulary)
                question = question_for(req, output, phrases, w, h, vocabulary)
            except RequestError as exc:
                return error(exc.status, exc.message)
            except Exception as exc:  # a request that broke a check instead of failing it: still the client's input
                log.exception("request validation raised instead of refusing")
                return error(400, f"the request could not be read: {type(exc).__name__}: {exc}")
            prompt = chat_prompt(self.processor, question)
            try:
                if self.cfg.batching.enabled:
                    text = await self._generate_batch((prompt, image))
                    if isinstance(text, BaseException):
                        raise text
                else:
                    text = await self._generate(prompt, image)
            except VLLMClientError as exc:  # e.g. the prompt does not fit the context length
                return error(422, f"the model cannot take this request: {exc}")
            except Exception as exc:  # the engine itself failed: 503, and this replica goes on serving
                log.exception("engine failed on a request")
                return error(503, f"the engine failed on this request ({type(exc).__name__}: {exc}); try again")
            objects, unreadable = to_objects(text, req.task, w, h, vocabulary, output)
            return {
                "objects": objects,
                "raw": text,
                "image_size": [w, h],
                "latency_ms": round((time.perf_counter() - t0) * 1000, 2),
                "unreadable": unreadable,
            }

    return Detector


def build_app(cfg: ServeConfig, model_dir: str | os.PathLike | None = None):
    """The Serve application for ``cfg`` (model directory resolved, tiny model built if needed)."""
    model_dir = Path(model_dir) if model_dir is not None else resolve_model_dir(cfg)
    d = cfg.deployment
    return (
        _detector_class(cfg.batching.max_concurrent_batches)
        .options(
            name=d.name,
            max_ongoing_requests=d.max_ongoing_requests,
            autoscaling_config={
                "min_replicas": d.min_replicas,
                "max_replicas": d.max_replicas,
                "initial_replicas": max(d.min_replicas, 1),
                "target_ongoing_requests": d.target_ongoing_requests,
            },
            ray_actor_options={"num_cpus": d.cpus_per_replica, "num_gpus": d.gpus_per_replica},
        )
        .bind(cfg.model_dump(), str(model_dir))
    )


class AppArgs(BaseModel):
    """``args:`` of the application in a Serve config file (configs/serve_app.yaml)."""

    model_config = ConfigDict(extra="forbid")
    config: str | None = Field(None, description="ServeConfig YAML (default configs/serve_tiny_cpu.yaml).")
    checkpoint: str | None = Field(None, description="Overrides model.checkpoint.")
    overrides: list[str] = Field(default_factory=list, description="key=value overrides, as on the command line.")


def load_serve_config(path=None, overrides=(), checkpoint: str | None = None) -> ServeConfig:
    cfg = load_config(_resolve(path) if path else DEFAULT_SERVE_CONFIG, overrides, schema=ServeConfig)
    if checkpoint is not None:
        cfg.model.checkpoint = checkpoint
    return cfg


def app_builder(args: dict):
    """Application builder for ``serve run`` / ``serve deploy`` (``import_path: rlsys.serve:app_builder``)."""
    try:
        a = AppArgs.model_validate(args or {})
    except ValidationError as exc:
        raise ConfigError(f"application args: {exc}") from None
    return build_app(load_serve_config(a.config, a.overrides, a.checkpoint))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m rlsys.serve",
        description=__doc__.split("\n\n")[0],
        epilog="Overrides are dotted keys, e.g. batching.enabled=false deployment.max_replicas=2.",
    )
    p.add_argument(
        "--checkpoint", help="Hugging Face checkpoint directory (default: model.checkpoint; none: the tiny model)"
    )
    p.add_argument("--config", help=f"ServeConfig YAML (default: {DEFAULT_SERVE_CONFIG.relative_to(REPO_ROOT)})")
    p.add_argument("--help-config", action="store_true", help="list every config field with its default and meaning")
    p.add_argument("overrides", nargs="*", help="key=value")
    a = p.parse_args(argv)
    if a.help_config:
        print("\n".join(describe(ServeConfig)))
        return 0
    try:
        cfg = load_serve_config(a.config, a.overrides, a.checkpoint)
        model_dir = resolve_model_dir(cfg)
    except (ConfigError, ValidationError) as exc:
        print(exc, file=sys.stderr)
        return 2

    import ray
    from ray import serve

    ray.init()  # joins RAY_ADDRESS or a `ray start` cluster of this machine, else starts a local one
    serve.start(http_options={"host": cfg.http.host, "port": cfg.http.port})
    serve.run(build_app(cfg, model_dir), name=cfg.deployment.name, route_prefix=cfg.http.route_prefix)
    base = f"http://{cfg.http.host}:{cfg.http.port}{cfg.http.route_prefix.rstrip('/')}"
    print(f"serving {model_dir} at {base}/v1/detect (health: {base}/v1/health); Ctrl-C stops", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # a service manager's stop shuts Serve down too
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
