"""DeepSpeed learner rank (and the colocated frozen reference policy). Placement and state only:
the loss is :func:`rlsys.grpo.algorithm.policy_loss`, the inputs come from :mod:`rlsys.grpo.sequences`."""

from __future__ import annotations

import contextlib
import os
import random
from dataclasses import replace

import ray

from actors.group import Members, balance_groups, bundle, micro_batch_plan, node_id, pack_micro_batches, round_robin
from actors.weight_sync import LearnerWeightSender, params_checksum, state_dict_buckets, tensors_source
from rlsys.config import LearnerConfig, deepspeed_config
from rlsys.grpo import lora
from rlsys.grpo.algorithm import policy_loss, warmup_factor
from rlsys.grpo.attention import resolve as attention_path
from rlsys.grpo.attention import use_block_masks
from rlsys.grpo.records import LearnerItem, LearnerStats
from rlsys.grpo.sequences import (
    banned_token_ids,
    build_batch,
    build_shared_batch,
    encode_prompts,
    merged_image_features,
    prompt_groups,
    shared_token_logprobs,
    token_logprobs,
    vision_tower_features,
)
from rlsys.jit_builds import clear_stale_build_locks
from rlsys.lang.vocab import model_tokens
from rlsys.models import family_of, load_model, load_processor, param_part


def rendezvous_address() -> tuple[str, int]:
    """This node's IP and a free port: rank 0's, where the other ranks connect."""
    import socket

    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    return ray.util.get_node_ip_address(), port


def _parameters_cpu(worker) -> dict:
    return {k: v.detach().cpu().clone() for k, v in worker.engine.module.named_parameters()}


@ray.remote
class LearnerWorker:
    """Construct all ranks, ask rank 0 for :meth:`address`, then call :meth:`setup` on every rank
    with it (rank 0 may sit on any node, so the driver's address would be wrong)."""

    def __init__(self, *, rank: int, world_size: int):
        self.rank, self.world = rank, world_size

    def address(self) -> tuple[str, int]:
        return rendezvous_address()

    def setup(
        self,
        model_dir: str,
        learner_cfg: LearnerConfig,
        *,
        master_addr: str,
        master_port: int,
        seed: int,
        dtype: str = "float32",
        trust_remote_code: bool = False,
        sampling_temperature: float = 1.0,
        pixels: dict | None = None,
        tokens: tuple = (),
    ) -> int:
        rank, world_size = self.rank, self.world
        os.environ.update(
            RANK=str(rank),
            WORLD_SIZE=str(world_size),
            LOCAL_RANK="0",
            MASTER_ADDR=master_addr,
            MASTER_PORT=str(master_port),
        )
        import deepspeed
        import torch

        self.cfg = learner_cfg
        self.temperature = sampling_temperature  # the rollout's; log-probs are taken under it
        torch.manual_seed(seed + rank)
        random.seed(seed + rank)
        cuda = torch.cuda.is_available() and learner_cfg.gpus_per_rank > 0
        clear_stale_build_locks()  # init_distributed builds DeepSpeed's CPU collective; a killed build's lock hangs it
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
        self.processor = load_processor(model_dir, trust_remote_code=trust_remote_code, pixels=pixels, tokens=tokens)
        self.pad_id = self.processor.tokenizer.pad_token_id

        self.family = family_of(model_dir)
        self.banned = banned_token_ids(self.processor.tokenizer)  # biased as the engines bias them
        model = load_model(model_dir, dtype=dtype, trust_remote_code=trust_remote_code)
        self.ref = None
        # learner.lora: adapters on the model; the reference is the same model with them off
        self.lora = learner_cfg.lora is not None
        if self.lora:
            model = lora.wrap(model, learner_cfg.lora, tokenizer=self.processor.tokenizer, tokens=tokens)
        elif learner_cfg.kl_coef > 0:
            self.ref = load_model(model_dir, dtype=dtype, trust_remote_code=trust_remote_code).eval()
            for p in self.ref.parameters():
                p.requires_grad_(False)
        # how a shared-prefix row keeps its answers apart (rlsys.grpo.attention): flex on GPUs
        self.attention = attention_path(learner_cfg.shared_prefix_attention, cuda)
        if learner_cfg.shared_prefix and self.attention == "flex":
            for m in (model, self.ref):
                if m is not None:
                    use_block_masks(m)
        if learner_cfg.freeze_vision:
            for name, p in model.named_parameters():
                if param_part(name) == "vision":
                    p.requires_grad_(False)
        if learner_cfg.gradient_checkpointing:
            # activations of each decoder layer are recomputed in backward instead of kept: the
            # memory of a long VLM sequence for about one more forward. Non-reentrant, so frozen
            # parts (freeze_vision) and inputs without grad still backpropagate.
            model.config.use_cache = False
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        trainable = [p for p in model.parameters() if p.requires_grad]
        if not trainable:
            raise ValueError("learner: no trainable parameters (freeze_vision left nothing to train?)")
        self.trainable_params = sum(p.numel() for p in trainable)
        optim = torch.optim.AdamW(trainable, lr=learner_cfg.lr, weight_decay=learner_cfg.weight_decay)
        # One optimizer step per GRPO step whatever the shard (accumulation steps 1): train() marks
        # the last micro-batch as the accumulation boundary itself (set_gradient_accumulation_boundary),
        # so a step with more or fewer micro-batches than the last one cannot move the optimizer
        # step into the next GRPO step.
        ds_config = deepspeed_config(
            micro_batch_size=learner_cfg.micro_batch_size,
            grad_clip=learner_cfg.grad_clip,
            zero_stage=learner_cfg.zero_stage,
            dtype=dtype,
        )

        # DeepSpeed steps the schedule with each optimizer step and saves it in its checkpoints,
        # so a resumed run continues the warm-up where it stopped.
        warmup = learner_cfg.warmup_steps
        sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda k: warmup_factor(k, warmup))
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optim, config=ds_config, lr_scheduler=sched)
        self.device = self.engine.device
        if self.ref is not None:
            self.ref.to(self.device)
        self._cache: dict = {}
        self._encoded = 0
        # freeze_vision: the tower's output per (prompt, image), for this step's passes
        self._vision: dict = {}
        self._vision_runs = 0
        return self.rank

    def _chunk_indices(self, items) -> list[list[int]]:
        """This rank's micro-batches over ``items`` (indices; :func:`actors.group.pack_micro_batches`):
        ``micro_batch_size`` answers, or whole groups within ``max_tokens_per_micro_batch``."""
        groups = prompt_groups(items)
        prompt_tokens = []
        if self.cfg.max_tokens_per_micro_batch is not None:
            before = len(self._cache)
            encs = encode_prompts(self.processor, [items[g[0]] for g in groups], self._cache)
            self._encoded += len(self._cache) - before
            prompt_tokens = [int(e["input_ids"].shape[1]) for e in encs]
        return pack_micro_batches(
            groups,
            prompt_tokens,
            [len(it.response_ids) for it in items],
            max_answers=self.cfg.micro_batch_size,
            max_tokens=self.cfg.max_tokens_per_micro_batch,
            shared=self.cfg.shared_prefix,
        )

    def plan(self, items: list[LearnerItem]) -> int:
        """How many micro-batches :meth:`train` needs for ``items`` (the driver takes the largest
        over the ranks, so every rank runs that many)."""
        return len(self._chunk_indices(items))

    def _logprobs(self, model, chunk, entropy: bool = True):
        """``(logp, entropy, mask)`` of ``chunk``'s answers under ``model``: shared-prefix rows
        (``learner.shared_prefix``, compact ``[B, T]``) or one sequence per answer (``[B, L-1]``);
        the loss reads either through ``mask``."""
        before = len(self._cache)
        if self.cfg.shared_prefix:
            batch = build_shared_batch(self.processor, chunk, self.pad_id, self._cache)
            out = shared_token_logprobs(
                model,
                batch,
                self.device,
                self.temperature,
                entropy=entropy,
                banned_ids=self.banned,
                mm_encoder_outputs=self._frozen_vision(model, chunk, batch),
                attention=self.attention,
            )
        else:
            inputs, targets, mask = build_batch(self.processor, chunk, self.pad_id, self._cache)
            inputs = {k: v.to(self.device) for k, v in inputs.items()}
            mask = mask.to(self.device)
            logp, ent = token_logprobs(
                model,
                inputs,
                targets.to(self.device),
                self.temperature,
                mask=mask,
                entropy=entropy,
                banned_ids=self.banned,
            )
            out = (logp, ent, mask)
        self._encoded += len(self._cache) - before  # processor runs this step (once per prompt)
        return out

    def _frozen_vision(self, model, chunk, batch):
        """With ``freeze_vision``: the image features for ``model``'s forward from the tower's
        output computed once per image per step (shared by the reference and the training pass;
        each model applies its own merger, the projector, which trains). None otherwise: the
        model runs its tower itself, as it does on a family whose tower this reuse is not
        written for (Qwen3-VL: DeepStack features beside the output, each with its own merger)."""
        if not (self.cfg.freeze_vision and self.family.reuses_frozen_tower) or "pixel_values" not in batch["encs"][0]:
            return None
        feats = []
        for g, enc in zip(prompt_groups(chunk), batch["encs"]):
            key = (chunk[g[0]].prompt, chunk[g[0]].image)
            if key not in self._vision:
                self._vision[key] = vision_tower_features(self.engine.module, enc, self.device)
                self._vision_runs += 1
            feats.append(self._vision[key])
        return merged_image_features(model, feats)

    def reference(self, items: list[LearnerItem]) -> list:
        """Per item, the frozen reference policy's log-probs of its answer (the step's only extra
        forward; there is none with ``kl_coef`` 0). No "old" log-prob pass: with one optimizer
        step per batch the proximal policy is the weights :meth:`train` starts from, so its own
        forward, detached, gives them."""
        import torch

        if self.ref is None and not (self.lora and self.cfg.kl_coef > 0):
            raise ValueError("learner: reference log-probs asked for, but kl_coef is 0 (no reference model loaded)")
        self._cache.clear()
        self._vision.clear()
        self._encoded = 0
        self._vision_runs = 0
        refs: list = [None] * len(items)
        # with LoRA the reference is the policy's own base: the adapters off for this pass
        ref_model = self.ref if self.ref is not None else self.engine
        adapters_off = self.engine.module.disable_adapter() if self.ref is None else contextlib.nullcontext()
        with torch.no_grad(), adapters_off:
            for idx in self._chunk_indices(items):
                ref, _, mask = self._logprobs(ref_model, [items[i] for i in idx], entropy=False)
                for b, i in enumerate(idx):
                    refs[i] = ref[b][mask[b]].cpu()
        # the processor's outputs stay cached for train() on the same items (it clears them)
        return refs

    def train(
        self,
        items: list[LearnerItem],
        num_tokens_global: int,
        num_micro_batches: int | None = None,
        pad_item: LearnerItem | None = None,
    ) -> LearnerStats:
        """One optimizer step over ``items`` (this rank's shard, possibly empty). Each item carries
        ``advantage``, ``ref_logp`` (per answer token, when ``kl_coef`` > 0), ``engine_logp`` (the
        behaviour policy's, as the engine reported them) and ``correct`` (apply the off-policy
        correction: its answers came from older weights, see :func:`rlsys.grpo.algorithm.policy_loss`).

        ``num_micro_batches``: how many forward/backward passes every rank runs this step (the
        same on all ranks: ZeRO-2 reduces gradients on every backward). A rank whose shard needs
        fewer runs the rest on ``pad_item`` with weight 0: the same collectives, no gradient.
        ``num_tokens_global``: answer tokens over all ranks, the loss's normaliser."""
        import torch

        idx_chunks = self._chunk_indices(items)
        need = len(idx_chunks)
        M = need if num_micro_batches is None else num_micro_batches
        if M < max(need, 1):
            budget = (
                f"{self.cfg.max_tokens_per_micro_batch} tokens"
                if self.cfg.max_tokens_per_micro_batch is not None
                else f"{self.cfg.micro_batch_size} answers"
            )
            raise ValueError(
                f"learner rank {self.rank}: {len(items)} items need {need} micro-batches of "
                f"{budget}, but the step plans {M}"
            )
        if need < M and pad_item is None and not items:
            raise ValueError(
                f"learner rank {self.rank}: an empty shard needs a pad_item to run its zero-weight micro-batches"
            )
        pad = pad_item if pad_item is not None else items[0]
        chunks = [([items[i] for i in idx], 1.0) for idx in idx_chunks] + [([pad], 0.0)] * (M - need)
        self.engine.train()
        sums = {"kl": 0.0, "clip": 0.0, "entropy": 0.0, "loss": 0.0}
        n_tok = 0
        gap = {"sum": 0.0, "n": 0}  # |engine - learner| log-prob on on-policy answers
        beh = {"w_sum": 0.0, "w_max": 0.0, "abs_log": 0.0, "truncated": 0, "n": 0}  # corrected answers
        cap = self.cfg.is_cap
        for k, (chunk, weight) in enumerate(chunks):
            encoded, seen = self._encoded, self._vision_runs
            logp, entropy, mask = self._logprobs(self.engine, chunk)
            if weight == 0.0:
                # a pad's prompt is not this step's data: not counted
                self._encoded, self._vision_runs = encoded, seen
            # the proximal ("old") policy: these weights, before this step's one update
            old = logp.detach()
            ref = None
            if self.cfg.kl_coef > 0:
                ref = torch.zeros_like(old)
                for b, it in enumerate(chunk):
                    ref[b][mask[b]] = it.ref_logp.to(ref)
            behaviour = None
            for b, it in enumerate(chunk):
                eng = it.engine_logp
                if eng is None or weight == 0.0:
                    continue
                eng = torch.as_tensor(eng, dtype=old.dtype, device=old.device)
                mine = old[b][mask[b]]
                if eng.shape != mine.shape:
                    raise ValueError(
                        f"learner rank {self.rank}: the engine reported {eng.numel()} log-probs for an answer "
                        f"of {mine.numel()} tokens ({it.image})"
                    )
                ok = torch.isfinite(eng)
                if it.correct:
                    if behaviour is None:
                        behaviour = old.clone()  # weight exp(0) = 1 exactly for the answers not corrected
                    behaviour[b][mask[b]] = eng
                    d = (mine - eng)[ok]
                    w = d.exp()
                    beh["w_sum"] += float(w.sum())
                    beh["w_max"] = max(beh["w_max"], float(w.max()) if w.numel() else 0.0)
                    beh["abs_log"] += float(d.abs().sum())
                    beh["truncated"] += int((w > cap).sum())
                    beh["n"] += int(ok.sum())
                else:
                    gap["sum"] += float((mine - eng)[ok].abs().sum())
                    gap["n"] += int(ok.sum())
            adv = torch.tensor([it.advantage for it in chunk], dtype=torch.float32, device=logp.device)
            loss, m = policy_loss(
                logp,
                old,
                ref,
                adv,
                mask,
                clip_low=self.cfg.clip_low,
                clip_high=self.cfg.clip_high,
                kl_coef=self.cfg.kl_coef,
                num_tokens=num_tokens_global,
                behaviour_logp=behaviour,
                is_cap=cap,
            )
            # The loss is normalised by the global answer-token count, so micro-batch losses add
            # up to the step's loss; DeepSpeed must neither divide by the accumulation steps
            # (scale_wrt_gas=False) nor, net, by the world size it averages gradients over.
            self.engine.set_gradient_accumulation_boundary(k == M - 1)
            self.engine.backward(loss * (self.world * weight), scale_wrt_gas=False)
            if weight == 0.0:
                continue
            n = int(m["num_tokens"])
            n_tok += n
            sums["kl"] += float(m["kl"]) * n
            sums["clip"] += float(m["clip_fraction"]) * n
            sums["entropy"] += float(entropy[mask].sum())
            sums["loss"] += float(loss.detach())
        lr = self.engine.get_lr()[0] if self.engine.get_lr() else self.cfg.lr  # the rate this update uses
        self.engine.step()  # the one optimizer step of this GRPO step (the boundary was the last backward)
        self._cache.clear()
        self._vision.clear()
        out = LearnerStats(
            tokens=n_tok,
            answers=len(items),
            loss=sums["loss"],
            kl_sum=sums["kl"],
            clip_sum=sums["clip"],
            entropy_sum=sums["entropy"],
            micro_batches=M,
            padded_micro_batches=M - need,
            encoded_prompts=self._encoded,
            vision_tower_runs=self._vision_runs,
            gap_sum=gap["sum"],
            gap_tokens=gap["n"],
            behaviour_tokens=beh["n"],
            behaviour_w_sum=beh["w_sum"],
            behaviour_w_max=beh["w_max"],
            behaviour_abs_log_sum=beh["abs_log"],
            behaviour_truncated=beh["truncated"],
            grad_norm=float(self.engine.get_global_grad_norm() or 0.0),
            lr=lr,
            optimizer_steps=self.engine.global_steps,
        )
        self._encoded = 0
        self._vision_runs = 0
        return out

    # -- weights out (rank 0) --------------------------------------------------------------------
    def connect_weights(
        self, engines: list, workers_per_engine: int, backend: str, bucket_bytes: int, timeout_s: float
    ) -> float:
        """Open the weight-transfer group with ``engines`` (vLLM's protocol; this rank is its
        rank 0 and hosts the rendezvous on a free port of its node). Returns seconds taken."""

        if getattr(self, "sender", None) is None or self.sender.backend != backend:
            self.sender = LearnerWeightSender(self.engine.module, backend, self._weights_source())
        addr, port = rendezvous_address()
        return self.sender.connect(
            engines,
            workers_per_engine,
            master_address=addr,
            master_port=port,
            bucket_bytes=bucket_bytes,
            timeout_s=timeout_s,
        )

    def send_weights(self) -> float:
        """One round of the protocol: start, update (buckets broadcast), finish on every engine."""
        return self.sender.send()

    def weights_timing(self) -> dict:
        """Seconds per phase of the last send (backends that record them)."""
        return dict(getattr(self.sender.engine, "timing", {}))

    def weight_buckets(self, bucket_bytes: int) -> list:
        """The fallback: the policy's weights as safetensors buckets in the object store, the
        same tensors the protocol sends (``named_parameters``, a tied embedding once)."""

        return [ray.put(b) for b in state_dict_buckets(self._weights_out(), bucket_bytes)]

    def _weights_out(self):
        """``(name, tensor)`` of what a sync sends: every parameter (a tied embedding once), or with
        LoRA the adapted layers' merged weights (:func:`rlsys.grpo.lora.merged_weights`)."""
        if self.lora:
            return lora.merged_weights(self.engine.module, only_changed=True)
        return self.engine.module.named_parameters()

    def _weights_source(self):
        """vLLM's ``WeightSource`` over :meth:`_weights_out` (None: the module's parameters)."""
        if not self.lora:
            return None
        return tensors_source(self._weights_out, lambda: lora.merged_shapes(self.engine.module, only_changed=True))

    def prompt_logprobs(self, prompt: str, image: str) -> tuple[list[int], list[float]]:
        """Log-prob of every prompt token after the first, as :meth:`RolloutWorker.prompt_logprobs`."""
        import torch

        enc = encode_prompts(self.processor, [LearnerItem(prompt=prompt, image=image, response_ids=[])])[0]
        inputs = {k: v.to(self.device) for k, v in enc.items()}
        with torch.no_grad():
            logits = self.engine.module(**inputs).logits[0, :-1].float()
        ids = inputs["input_ids"][0]
        lps = torch.log_softmax(logits, -1).gather(-1, ids[1:, None])[:, 0]
        return ids.tolist(), lps.cpu().tolist()

    def state_dict_cpu(self) -> dict:
        """The full state dict as CPU tensors (for the benchmark's naive per-tensor sync).

        Cloned: under ZeRO the parameters are views into one flat buffer, and pickling a view
        writes its whole storage, so without the copy each tensor would carry the whole model
        (28.7M parameters x 153 tensors came to 17 GB and Ray's OOM killer stopped the learner)."""
        return {k: v.detach().cpu().clone() for k, v in self.engine.module.state_dict().items()}

    def checksum(self) -> dict:
        """Digest of exactly what a weight sync sends (see :meth:`connect_weights`)."""

        return params_checksum(self._weights_out())

    def save(self, path: str, hf: bool) -> None:
        """DeepSpeed state (model, optimizer, per-rank) under path/ds; rank 0 also writes a Hugging
        Face directory under path/hf. The caller renames ``path`` into place (atomic)."""
        import torch

        self.engine.save_checkpoint(
            os.path.join(path, "ds"),
            tag="state",
            client_state={"torch_rng": torch.get_rng_state(), "py_rng": random.getstate()},
        )
        if hf and self.rank == 0:
            lora.save_pretrained(self.engine.module, os.path.join(path, "hf"))  # adapters merged
            self.processor.save_pretrained(os.path.join(path, "hf"))

    def load(self, path: str) -> None:
        import torch

        _, client = self.engine.load_checkpoint(os.path.join(path, "ds"), tag="state")
        if client:
            torch.set_rng_state(client["torch_rng"])
            random.setstate(client["py_rng"])


class LearnerGroup:
    """Driver-side handle over ``num_ranks`` DeepSpeed ranks (one placement group, PACK: ranks on
    as few nodes as hold them, NCCL inside a node).

    Sharding: with ``learner.shared_prefix`` each prompt group goes whole to one rank, ranks
    balanced by tokens (:meth:`shard_indices`), else answers are dealt to the ranks in turn; every
    rank then runs the same number of micro-batches (``micro_batch_size`` answers each,
    :func:`actors.group.micro_batch_plan`, or packed by ``max_tokens_per_micro_batch``), padding with zero-weight ones, and
    takes exactly one optimizer step per call, so uneven shards, dropped empty answers or a rank
    with no data cannot desynchronise ZeRO's collectives. The loss is normalised by the global
    token count, so N ranks give the one-rank update.

    Every call has ``learner.timeout_s``. A dead rank cannot be replaced inside a running
    torch.distributed group: the error names the rank and the call, and the run resumes from its
    last checkpoint (``run.resume``)."""

    name = "learner"

    def __init__(self, cfg, model_dir: str, start_timeout_s: float):
        self.cfg = cfg
        le = cfg.learner
        self.timeout_s = le.timeout_s

        def start(rank: int, strategy):
            return LearnerWorker.options(
                num_cpus=le.cpus_per_rank, num_gpus=le.gpus_per_rank, scheduling_strategy=strategy
            ).remote(rank=rank, world_size=le.num_ranks)

        bundles = [bundle(le.cpus_per_rank, le.gpus_per_rank, le.resources_per_rank)] * le.num_ranks
        self.members = Members(self.name, bundles, "PACK", start_timeout_s, start)
        addr, port = self.members.each([self.ranks[0].address.remote()], start_timeout_s, "rank 0 start")[0]
        self._setup = [
            w.setup.remote(
                model_dir,
                le,
                master_addr=addr,
                master_port=port,
                seed=cfg.run.seed,
                dtype=cfg.model.dtype,
                trust_remote_code=cfg.model.trust_remote_code,
                sampling_temperature=cfg.rollout.temperature,
                pixels=cfg.model.pixel_budget(),
                tokens=model_tokens(cfg.model),
            )
            for w in self.ranks
        ]

    @property
    def ranks(self) -> list:
        return self.members.handles

    def ready(self, timeout_s: float) -> None:
        """Wait until every rank has loaded the model and joined the process group."""
        self.members.each(self._setup, timeout_s, "start-up")

    def _each(self, refs, what: str, timeout_s: float | None = None) -> list:
        """Failure policy: none can be retried. A dead rank cannot be replaced inside a running
        torch.distributed group, so the error names it and says how the run goes on."""
        return self.members.each(
            refs,
            timeout_s or self.timeout_s,
            what,
            advice="A learner rank cannot be replaced inside a running group: the run rebuilds its groups "
            "from the last checkpoint (run.max_restarts), or, past that, resumes from it when started again",
        )

    def shard_indices(self, items: list) -> list[list[int]]:
        """Item indices per rank. Shared prefix: each prompt group whole on one rank (its prompt
        then runs once), ranks balanced by the tokens they will run (the prompt once, as the engine
        reported it, plus every answer). Otherwise answers dealt in turn."""
        if not self.cfg.learner.shared_prefix:
            return round_robin(len(items), len(self.ranks))
        groups = prompt_groups(items)
        costs = [len(items[g[0]].prompt_ids or ()) + sum(len(items[i].response_ids) for i in g) for g in groups]
        return balance_groups(groups, costs, len(self.ranks))

    def shard(self, items: list) -> list[list]:

        return [[items[i] for i in idx] for idx in self.shard_indices(items)]

    def reference(self, items: list[LearnerItem]) -> list[LearnerItem]:
        """The items with their ``ref_logp`` (the frozen reference policy), in the same order,
        computed sharded as :meth:`train` will shard them, so each rank's processor outputs are
        reused by its update."""
        idx = self.shard_indices(items)
        shards = [[items[i] for i in ix] for ix in idx]
        res = self._each([w.reference.remote(sh) for w, sh in zip(self.ranks, shards)], "reference log-probs")
        out: list = [None] * len(items)
        for ix, sh, refs in zip(idx, shards, res):
            for i, it, r in zip(ix, sh, refs):
                out[i] = replace(it, ref_logp=r)
        return out

    def train(self, items: list[LearnerItem]) -> LearnerStats:
        """One optimizer step on every rank over ``items``; the ranks' figures merged
        (:attr:`last_ranks` keeps each rank's)."""

        if not items:
            raise ValueError("learner update with no answers to learn from")
        shards = self.shard(items)
        if self.cfg.learner.max_tokens_per_micro_batch is None:
            M = micro_batch_plan([len(sh) for sh in shards], self.cfg.learner.micro_batch_size)
        else:
            # packed by tokens: only a rank knows its prompts' lengths (its processor), so each
            # plans its own shard and all run the largest count
            plans = self._each([w.plan.remote(sh) for w, sh in zip(self.ranks, shards)], "micro-batch plan")
            M = max(1, *plans)
        num_tokens = sum(len(it.response_ids) for it in items)
        pad = items[0]
        self.last_ranks = self._each(
            [w.train.remote(sh, num_tokens, M, None if sh else pad) for w, sh in zip(self.ranks, shards)],
            "learner update",
        )
        return LearnerStats.merge(self.last_ranks)

    def save(self, path: str) -> None:
        self._each([w.save.remote(path, True) for w in self.ranks], "checkpoint save")

    def load(self, path: str) -> None:
        self._each([w.load.remote(path) for w in self.ranks], "learner resume")

    def checksum(self) -> dict:
        return self._each([self.ranks[0].checksum.remote()], "learner checksum", 600)[0]

    def parameters(self) -> list[dict]:
        """Every rank's parameters, cloned to CPU (tests compare ranks and runs with them)."""
        return self.members.inspect(_parameters_cpu)

    def prompt_logprobs(self, prompt: str, image: str):
        return self._each([self.ranks[0].prompt_logprobs.remote(prompt, image)], "learner log-probs", 600)[0]

    # weights out: rank 0 holds the whole model under ZeRO <= 2
    def connect_weights(
        self, engines: list, workers_per_engine: int, backend: str, bucket_bytes: int, timeout_s: float
    ) -> float:
        return self._each(
            [self.ranks[0].connect_weights.remote(engines, workers_per_engine, backend, bucket_bytes, timeout_s)],
            "weight-transfer connect",
            timeout_s,
        )[0]

    def send_weights(self, timeout_s: float) -> float:
        return self._each([self.ranks[0].send_weights.remote()], "weight send", timeout_s)[0]

    def weights_timing(self) -> dict:
        return self._each([self.ranks[0].weights_timing.remote()], "weight-transfer timing", 60)[0]

    def weight_buckets(self, bucket_bytes: int) -> list:
        return self._each([self.ranks[0].weight_buckets.remote(bucket_bytes)], "weight export")[0]

    def node_ids(self) -> list[str]:
        return self.members.inspect(node_id, timeout_s=60)

    def shutdown(self) -> None:
        self.members.shutdown()
