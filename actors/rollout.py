"""Rollout generator: one vLLM engine per Ray actor. Placement and state only.

It samples ``n`` answers per prompt with the prompt's image and returns, per answer, the token
ids, their sampling log-probs and the text (special tokens kept: the output format is made of
them). It loads new weights from the learner through :mod:`actors.weight_sync`.
"""

from __future__ import annotations

import os
import time

import ray

VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")

@ray.remote
class RolloutWorker:
    def __init__(self, model_dir: str, *, max_model_len: int, gpu_memory_utilization: float,
                 enforce_eager: bool, seed: int, dtype: str = "float32"):
        os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
        from vllm import LLM

        t0 = time.perf_counter()
        self.llm = LLM(
            model=model_dir,
            max_model_len=max_model_len,
            gpu_memory_utilization=gpu_memory_utilization,
            enforce_eager=enforce_eager,
            limit_mm_per_prompt={"image": 1, "video": 0},
            seed=seed,
            # the learner's dtype: after a sync the engine's weights equal the learner's bit for bit
            dtype=dtype,
            worker_extension_cls="actors.weight_sync.VllmWorkerExtension",
            trust_remote_code=False,
            # log-probs of the distribution tokens were drawn from (after temperature, top-p and
            # the logit bias below), so the controller can compare them with the learner's
            logprobs_mode="processed_logprobs",
        )
        self.start_s = time.perf_counter() - t0
        # Vision placeholders must never be sampled: the learner re-reads prompt + answer through
        # the processor, and an <|image_pad|> in an answer is taken for an image slot with no
        # features ("Image features and image tokens do not match"; a random tiny model samples
        # one in a few hundred tokens). A bias of -100 (vLLM's floor) removes them.
        tok = self.llm.get_tokenizer()
        ids = [tok.convert_tokens_to_ids(t) for t in VISION_TOKENS]
        self.banned = {i: -100.0 for i in ids if isinstance(i, int) and i != tok.unk_token_id}

    def ready(self) -> float:
        return self.start_s

    def generate(self, requests: list[dict], *, n: int, temperature: float, top_p: float,
                 max_new_tokens: int, seed: int, min_new_tokens: int = 0) -> list[list[dict]]:
        """``requests``: ``{"prompt": chat text, "image": path}``; returns per request ``n`` answers."""
        from PIL import Image
        from vllm import SamplingParams

        from vllm.platforms import current_platform

        # A per-request seed makes vLLM keep a torch.Generator per request and rewind its offset
        # when a step's sample is discarded (a prompt prefilled in chunks). CPU generators have
        # no offset: the engine dies with "CPU Generator does not use offset" once a batch's
        # prompts exceed one prefill chunk. On CPU the engine's own seed (set at start) is used.
        req_seed = None if current_platform.is_cpu() else seed
        sp = SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_new_tokens,
                            min_tokens=min_new_tokens, logprobs=0, skip_special_tokens=False, seed=req_seed,
                            logit_bias=self.banned or None)
        inputs = []
        for r in requests:
            with Image.open(r["image"]) as im:
                inputs.append({"prompt": r["prompt"], "multi_modal_data": {"image": im.convert("RGB")}})
        outs = self.llm.generate(inputs, sp, use_tqdm=False)
        result = []
        for o in outs:
            answers = []
            for c in o.outputs:
                lps = [d[t].logprob if d and t in d else float("nan") for t, d in zip(c.token_ids, c.logprobs or [])]
                answers.append({"token_ids": list(c.token_ids), "logprobs": lps, "text": c.text,
                                "finish_reason": c.finish_reason})
            result.append(answers)
        return result

    def load_weight_buckets(self, *bucket_refs) -> int:
        """Load safetensors buckets (passed as object refs, resolved by Ray) into the engine."""
        from actors.weight_sync import write_shm

        paths = [write_shm(blob) for blob in bucket_refs]
        try:
            # one RPC for all buckets; every tensor-parallel worker of the engine loads them
            loaded = self.llm.collective_rpc("rlsys_load_weights_files", args=(paths,))[0]
        finally:
            for p in paths:
                os.unlink(p)
        # The reload clears the workers' encoder and multi-modal caches; the engine's scheduler
        # and the front end keep their own view of them, which must be cleared too, or the next
        # image request refers to a vision embedding the worker no longer has ("Encoder cache
        # miss"). Cached prefixes were computed with the old weights as well.
        self.llm.llm_engine.reset_encoder_cache()
        self.llm.reset_mm_cache()
        self.llm.reset_prefix_cache()
        return loaded

    def prompt_logprobs(self, prompt: str, image: str) -> tuple[list[int], list[float]]:
        """The engine's log-prob of every prompt token after the first (image placeholders
        included), to compare with the learner's on the same input."""
        from PIL import Image
        from vllm import SamplingParams

        with Image.open(image) as im:
            inp = {"prompt": prompt, "multi_modal_data": {"image": im.convert("RGB")}}
        out = self.llm.generate([inp], SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0), use_tqdm=False)[0]
        ids = list(out.prompt_token_ids)
        lps = [d[t].logprob for t, d in zip(ids[1:], out.prompt_logprobs[1:])]
        return ids, lps

    # The naive transport the benchmark compares against: one Ray call per tensor, then one reload.
    def stage_tensor(self, name: str, tensor) -> None:
        self._staged = getattr(self, "_staged", {})
        self._staged[name] = tensor

    def load_staged(self) -> int:
        from safetensors.torch import save

        staged, self._staged = getattr(self, "_staged", {}), {}
        return self.load_weight_buckets(save(staged))

    def checksum(self) -> dict:
        return self.llm.collective_rpc("rlsys_checksum")[0]
