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
import functools
import logging
import os
import signal
import sys
import time
import uuid
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from rlsys.config import (
    DEFAULT_SERVE_CONFIG,
    REPO_ROOT,
    ConfigError,
    ServeConfig,
    describe,
    load_config,
    vllm_engine_args,
)
from rlsys.lang.format import control_tokens
from rlsys.lang.prompts import chat_prompt
from rlsys.lang.vocab import vocabulary_for
from rlsys.models import check_token_layout, ensure_tiny_model, processor_for
from rlsys.serve.requests import RequestError, prepare_request, read_body, to_objects

log = logging.getLogger("rlsys.serve")


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
            try:  # before Ray: a tokenizer that does not fit the weights (the release's files, say)
                processor_for(cfg.model, cand, pixels=False)
            except ValueError as exc:
                raise ConfigError(f"model.checkpoint {cand}: {exc}") from None
            return cand
    raise ConfigError(f"model.checkpoint {p}: not a Hugging Face checkpoint directory (no config.json in it or in hf/)")


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
            self.processor = processor_for(self.cfg.model, model_dir)

            self.control = control_tokens(self.processor.tokenizer)
            self.vocabulary = vocabulary_for(self.cfg.model, self.processor)
            t0 = time.perf_counter()
            self.engine = AsyncLLM.from_engine_args(
                AsyncEngineArgs(**vllm_engine_args(self.cfg.model, model_dir, e, seed=e.seed))
            )
            self.engine_start_s = time.perf_counter() - t0
            check_token_layout(self.engine.get_tokenizer(), model_dir, "vLLM engine's tokenizer")
            # special tokens kept: the output language is made of them. FINAL_ONLY: the answer is
            # returned whole, so the engine need not wake this coroutine (and build a cumulative
            # output) at every token of every request in the batch
            self.sampling = SamplingParams(
                max_tokens=g.max_new_tokens,
                temperature=g.temperature,
                top_p=g.top_p,
                repetition_penalty=g.repetition_penalty,
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
                body = await read_body(request, limits.max_request_bytes)
            except RequestError as exc:
                return error(exc.status, exc.message)
            except Exception as exc:  # the client's stream broke off: still the client's input
                return error(400, f"the request body could not be read: {type(exc).__name__}: {exc}")
            # every check, image decoding (or fetching) included, off the event loop
            p = await asyncio.to_thread(
                prepare_request, body, limits, self.control, self.vocabulary, self.cfg.model.prompt_set
            )
            if isinstance(p, RequestError):
                return error(p.status, p.message)
            prompt = chat_prompt(self.processor, p.question, self.cfg.model.prompt_set)
            try:
                if self.cfg.batching.enabled:
                    text = await self._generate_batch((prompt, p.image))
                    if isinstance(text, BaseException):
                        raise text
                else:
                    text = await self._generate(prompt, p.image)
            except VLLMClientError as exc:  # e.g. the prompt does not fit the context length
                return error(422, f"the model cannot take this request: {exc}")
            except Exception as exc:  # the engine itself failed: 503, and this replica goes on serving
                log.exception("engine failed on a request")
                return error(503, f"the engine failed on this request ({type(exc).__name__}: {exc}); try again")
            w, h = p.image.size
            objects, unreadable = to_objects(text, p.request.task, w, h, p.vocabulary, p.output)
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
