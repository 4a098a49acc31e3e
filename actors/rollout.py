"""Rollout generator: one vLLM engine per Ray actor. Placement and state only.

It samples ``n`` answers per prompt with the prompt's image and returns, per answer, the token
ids, their sampling log-probs and the text (special tokens kept: the output format is made of
them). It loads new weights from the learner through :mod:`actors.weight_sync`.
"""

from __future__ import annotations

import logging
import os
import time

import ray

import actors.weight_sync  # noqa: F401  registers rlsys_gloo in vLLM's factories (here and in the workers)
from actors.group import MemberFailed, Members, bundle, node_id, round_robin
from actors.weight_sync import write_shm
from rlsys.config import prepare_sync_engine_process, vllm_engine_args
from rlsys.data.images import open_rgb
from rlsys.grpo.records import Answer, Refusal
from rlsys.grpo.sequences import BANNED_LOGIT_BIAS, banned_token_ids
from rlsys.models import check_token_layout

log = logging.getLogger(__name__)


@ray.remote
class RolloutWorker:
    def __init__(self, engine_args: dict, weight_transfer: str = "rlsys_gloo"):
        """``engine_args``: :func:`rlsys.config.vllm_engine_args`, built on the driver; the
        rollout engine adds the weight-transfer protocol, the worker extension that receives
        weights, and log-probs of the distribution tokens were drawn from."""
        prepare_sync_engine_process()
        from vllm import LLM

        extra = {}
        if weight_transfer != "object_store":
            from vllm.config import WeightTransferConfig

            extra["weight_transfer_config"] = WeightTransferConfig(backend=weight_transfer)

        t0 = time.perf_counter()
        self.llm = LLM(
            **engine_args,
            worker_extension_cls="actors.weight_sync.VllmWorkerExtension",
            # log-probs of the distribution tokens were drawn from (after temperature, top-p and
            # the logit bias below), so the controller can compare them with the learner's
            logprobs_mode="processed_logprobs",
            **extra,
        )
        self.start_s = time.perf_counter() - t0
        # vLLM reads the tokenizer itself: it must give the ids the driver checked
        check_token_layout(self.llm.get_tokenizer(), engine_args["model"], "vLLM engine's tokenizer")
        self.llm.collective_rpc("rlsys_track_received")
        # Vision placeholders must never be sampled: the learner re-reads prompt + answer through
        # the processor, and an <|image_pad|> in an answer is taken for an image slot with no
        # features ("Image features and image tokens do not match"; a random tiny model samples
        # one in a few hundred tokens). A bias of -100 (vLLM's floor) removes them.

        self.banned = {i: BANNED_LOGIT_BIAS for i in banned_token_ids(self.llm.get_tokenizer())}

    def ready(self) -> float:
        return self.start_s

    def generate(
        self,
        requests: list[dict],
        *,
        n: int,
        temperature: float,
        top_p: float,
        max_new_tokens: int,
        seed: int,
        min_new_tokens: int = 0,
        repetition_penalty: float = 1.0,
    ) -> list[list[Answer] | Refusal]:
        """``requests``: ``{"prompt": chat text, "image": path}``; returns per request ``n`` answers,
        or a :class:`Refusal` for a request the engine would not take (the others still run)."""
        from vllm import SamplingParams
        from vllm.exceptions import VLLMClientError
        from vllm.platforms import current_platform

        # A per-request seed makes vLLM keep a torch.Generator per request and rewind its offset
        # when a step's sample is discarded (a prompt prefilled in chunks). CPU generators have
        # no offset: the engine dies with "CPU Generator does not use offset" once a batch's
        # prompts exceed one prefill chunk. On CPU the engine's own seed (set at start) is used.
        req_seed = None if current_platform.is_cpu() else seed
        sp = SamplingParams(
            n=n,
            temperature=temperature,
            top_p=top_p,
            repetition_penalty=repetition_penalty,
            max_tokens=max_new_tokens,
            min_tokens=min_new_tokens,
            logprobs=0,
            skip_special_tokens=False,
            seed=req_seed,
            logit_bias=self.banned or None,
        )
        inputs = []
        # An image that passed the check at start but does not decode now (changed on disk, a
        # network file system) fails its request alone, as a Refusal the controller counts
        refused: dict[int, Refusal] = {}
        for k, r in enumerate(requests):
            try:
                image = open_rgb(r["image"])
            except Exception as exc:  # PIL raises several types for a file it cannot decode
                refused[k] = Refusal(f"{r['image']}: {type(exc).__name__}: {exc}", image_unreadable=True)
                image = None
            inputs.append({"prompt": r["prompt"], "multi_modal_data": {"image": image}})
        ok = [k for k in range(len(inputs)) if k not in refused]
        try:
            got = self.llm.generate([inputs[k] for k in ok], sp, use_tqdm=False) if ok else []
        except (ValueError, VLLMClientError) as exc:
            # vLLM refused a request before running the batch (longer than the context, say):
            # that request fails, not the engine. Find which ones, then run the others.
            log.warning("the engine refused a request of this batch (%s); checking them one by one", exc)
            probe = SamplingParams(n=1, max_tokens=1, logit_bias=self.banned or None)
            for k in ok:
                try:
                    self.llm.generate([inputs[k]], probe, use_tqdm=False)
                except (ValueError, VLLMClientError) as e:
                    refused[k] = Refusal(f"{type(e).__name__}: {e}")
            ok = [k for k in ok if k not in refused]
            got = self.llm.generate([inputs[k] for k in ok], sp, use_tqdm=False) if ok else []
        outs = dict(zip(ok, got))
        result = []
        for k in range(len(inputs)):
            o = outs.get(k)
            if o is None:
                result.append(refused[k])
                continue
            answers = []
            for c in o.outputs:
                lps = [d[t].logprob if d and t in d else float("nan") for t, d in zip(c.token_ids, c.logprobs or [])]
                answers.append(
                    Answer(
                        text=c.text,
                        token_ids=list(c.token_ids),
                        logprobs=lps,
                        finish_reason=c.finish_reason,
                        # the prompt as the engine tokenised it (image placeholders
                        # expanded): the learner checks its own rendering against it
                        prompt_ids=list(o.prompt_token_ids),
                    )
                )
            result.append(answers)
        return result

    # -- vLLM's weight-transfer protocol (driven by the learner's EngineGroupClient) ------------
    def transfer_workers(self) -> int:
        """Workers of this engine that join the transfer group (tensor x pipeline parallel)."""
        return int(self.llm.llm_engine.vllm_config.parallel_config.world_size)

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        self.llm.init_weight_transfer_engine({"init_info": init_info})

    def start_weight_update(self) -> None:
        self.llm.start_weight_update()

    def update_weights(self, update_info) -> None:
        self.llm.update_weights({"update_info": update_info})

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self.llm.finish_weight_update(weight_version)
        self.llm.collective_rpc("rlsys_after_weight_update")
        self._reset_caches()

    def shutdown_weight_transfer_engine(self) -> None:
        self.llm.shutdown_weight_transfer_engine()

    def _reset_caches(self) -> None:
        # The engine's scheduler and the front end keep their own view of the encoder and
        # multi-modal caches, which must be cleared too, or the next image request refers to a
        # vision embedding the worker no longer has ("Encoder cache miss"). Cached prefixes
        # were computed with the old weights as well.
        self.llm.llm_engine.reset_encoder_cache()
        self.llm.reset_mm_cache()
        self.llm.reset_prefix_cache()

    # -- the fallback transport (object store + /dev/shm) --------------------------------------
    def load_weight_buckets(self, *bucket_refs) -> int:
        """Load safetensors buckets (passed as object refs, resolved by Ray) into the engine."""

        paths = [write_shm(blob) for blob in bucket_refs]
        try:
            # one RPC for all buckets; every tensor-parallel worker of the engine loads them
            loaded = self.llm.collective_rpc("rlsys_load_weights_files", args=(paths,))[0]
        finally:
            for p in paths:
                os.unlink(p)
        self._reset_caches()
        return loaded

    def prompt_logprobs(self, prompt: str, image: str) -> tuple[list[int], list[float]]:
        """The engine's log-prob of every prompt token after the first (image placeholders
        included), to compare with the learner's on the same input."""
        from vllm import SamplingParams

        inp = {"prompt": prompt, "multi_modal_data": {"image": open_rgb(image)}}
        out = self.llm.generate(
            [inp], SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0), use_tqdm=False
        )[0]
        ids = list(out.prompt_token_ids)
        lps = [d[t].logprob for t, d in zip(ids[1:], out.prompt_logprobs[1:])]
        return ids, lps

    def checksum(self) -> dict:
        return self.llm.collective_rpc("rlsys_checksum")[0]


class RolloutGroup:
    """Driver-side handle over ``num_engines`` engine actors (:class:`actors.group.Members`, one
    placement group, SPREAD).

    Sharding: prompts are dealt to the engines in turn. Per call: ``rollout.timeout_s``, one
    deadline for all engines. Failure policy: a dead or stuck engine is killed and restarted in its
    own bundle, given the current weights (``on_restart``, set by the controller to its weight
    sync) and only its prompts are retried, once; the answers of the engines that succeeded are
    kept. A second failure is an error naming the engine and the step."""

    name = "rollout"

    def __init__(self, cfg, model_dir: str, start_timeout_s: float):
        self.cfg, self.model_dir = cfg, model_dir
        ro = cfg.rollout

        def start(k: int, strategy):
            return RolloutWorker.options(
                num_cpus=ro.cpus_per_engine, num_gpus=ro.gpus_per_engine, scheduling_strategy=strategy
            ).remote(
                vllm_engine_args(cfg.model, model_dir, ro, seed=cfg.run.seed + k),
                weight_transfer=cfg.weight_transfer_backend,
            )

        bundles = [bundle(ro.cpus_per_engine, ro.gpus_per_engine, ro.resources_per_engine)] * ro.num_engines
        self.members = Members(self.name, bundles, "SPREAD", start_timeout_s, start)
        self.retried: list[tuple[int, int, list[int]]] = []  # (step, engine, request indices) per retry
        self.on_restart = None  # callable(engine indices) -> None: brings restarted engines to the current weights

    @property
    def engines(self) -> list:
        return self.members.handles

    @property
    def restarts(self) -> int:
        return self.members.restarts

    def ready(self, timeout_s: float) -> None:
        """Wait until every engine has loaded the model."""
        self.members.each([e.ready.remote() for e in self.engines], timeout_s, "start-up")

    def submit(self, requests: list[dict], *, step: int) -> dict:
        """Start generating (returns at once); :meth:`collect` waits for the answers. An engine
        runs its calls in the order they were submitted, so a weight push submitted after this
        reaches that engine between this batch and the next."""
        shards = round_robin(len(requests), len(self.engines))
        job = {"requests": requests, "step": step, "shards": shards, "calls": {}}
        job["calls"] = {k: self._call(job, k, attempt=0) for k, sh in enumerate(shards) if sh}
        return job

    def _call(self, job: dict, k: int, attempt: int):
        ro, seed = self.cfg.rollout, self.cfg.run.seed
        engine = self.engines[k]
        ref = engine.generate.remote(
            [job["requests"][j] for j in job["shards"][k]],
            n=ro.samples_per_prompt,
            temperature=ro.temperature,
            top_p=ro.top_p,
            repetition_penalty=ro.repetition_penalty,
            max_new_tokens=ro.max_new_tokens,
            seed=seed * 100003 + job["step"] * 101 + k + attempt,
        )
        return engine, ref

    def collect(self, job: dict) -> list[list[Answer] | Refusal]:
        """The answers of a :meth:`submit`: a dead or stuck engine is restarted (unless another
        batch's collect already replaced it) and its prompts retried once."""
        ro, step, shards = self.cfg.rollout, job["step"], job["shards"]
        out: list = [None] * len(job["requests"])
        calls = job["calls"]
        for attempt in (0, 1):
            res = self.members.wait(
                {k: ref for k, (_, ref) in calls.items()}, ro.timeout_s, f"generation of step {step}"
            )
            failed, restarted = [], []
            for k, r in res.items():
                if not isinstance(r, MemberFailed):
                    for j, ans in zip(shards[k], r):
                        out[j] = ans
                    continue
                if attempt == 1:
                    raise MemberFailed("rollout", k, f"generation of step {step}, after a restart", r) from r
                failed.append(k)
                if self.engines[k] is not calls[k][0]:
                    # a batch submitted before this one found the engine dead and replaced it
                    # (with the current weights): only this batch's prompts are retried
                    log.warning(
                        "rollout engine %d was replaced while this batch waited (step %d); retrying its %d prompts",
                        k,
                        step,
                        len(shards[k]),
                    )
                    continue
                log.warning(
                    "rollout engine %d failed in step %d (%s); restarting it and retrying its %d prompts",
                    k,
                    step,
                    str(r).splitlines()[0],
                    len(shards[k]),
                )
                self.members.restart(k)
                restarted.append(k)
            if not failed:
                break
            if restarted:
                self.members.each(
                    [self.engines[k].ready.remote() for k in restarted],
                    self.cfg.run.actor_start_timeout_s,
                    "restarted rollout engine start-up",
                )
                if self.on_restart is not None:
                    self.on_restart(restarted)
            self.retried += [(step, k, list(shards[k])) for k in failed]
            calls = {k: self._call(job, k, attempt=1) for k in failed}
        return out

    def transfer_workers(self) -> int:
        per = self.members.each(
            [e.transfer_workers.remote() for e in self.engines], self.cfg.rollout.timeout_s, "engine transfer workers"
        )
        if len(set(per)) != 1:
            raise RuntimeError(f"engines of one rollout group differ in their worker counts: {per}")
        return per[0]

    def checksums(self) -> list[dict | None]:
        return self.members.each([e.checksum.remote() for e in self.engines], 600, "engine checksum")

    def prompt_logprobs(self, prompt: str, image: str) -> list[tuple[list[int], list[float]]]:
        return self.members.each(
            [e.prompt_logprobs.remote(prompt, image) for e in self.engines], 600, "engine log-probs"
        )

    def node_ids(self) -> list[str]:
        return self.members.inspect(node_id, timeout_s=60)

    def shutdown(self) -> None:
        self.members.shutdown()
