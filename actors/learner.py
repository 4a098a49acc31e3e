"""DeepSpeed learner rank (and the colocated frozen reference policy). Placement and state only:
the loss is :func:`rlsys.algorithm.policy_loss`, the inputs come from :mod:`rlsys.sequences`."""

from __future__ import annotations

import os
import random
import time

import ray


def rendezvous_address() -> tuple[str, int]:
    """This node's IP and a free port: rank 0's, where the other ranks connect."""
    import socket

    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    return ray.util.get_node_ip_address(), port


@ray.remote
class LearnerWorker:
    """Construct all ranks, ask rank 0 for :meth:`address`, then call :meth:`setup` on every rank
    with it (rank 0 may sit on any node, so the driver's address would be wrong)."""

    def __init__(self, *, rank: int, world_size: int):
        self.rank, self.world = rank, world_size

    def address(self) -> tuple[str, int]:
        return rendezvous_address()

    def setup(self, model_dir: str, learner_cfg: dict, *, master_addr: str, master_port: int,
              micro_batches_per_step: int, seed: int, dtype: str = "float32", trust_remote_code: bool = False,
              sampling_temperature: float = 1.0) -> int:
        rank, world_size = self.rank, self.world
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK="0",
                          MASTER_ADDR=master_addr, MASTER_PORT=str(master_port))
        import deepspeed
        import torch

        from rlsys.models import load_model, load_processor

        self.cfg = learner_cfg
        self.temperature = sampling_temperature  # the rollout's; log-probs are taken under it
        torch.manual_seed(seed + rank)
        random.seed(seed + rank)
        cuda = torch.cuda.is_available() and learner_cfg["gpus_per_rank"] > 0
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
        self.processor = load_processor(model_dir, trust_remote_code=trust_remote_code)
        self.pad_id = self.processor.tokenizer.pad_token_id
        model = load_model(model_dir, dtype=dtype, trust_remote_code=trust_remote_code)
        self.ref = None
        if learner_cfg["kl_coef"] > 0:
            self.ref = load_model(model_dir, dtype=dtype, trust_remote_code=trust_remote_code).eval()
            for p in self.ref.parameters():
                p.requires_grad_(False)
        if learner_cfg.get("freeze_vision"):
            from rlsys.models import param_part

            for name, p in model.named_parameters():
                if param_part(name) == "vision":
                    p.requires_grad_(False)
        trainable = [p for p in model.parameters() if p.requires_grad]
        if not trainable:
            raise ValueError("learner: no trainable parameters (freeze_vision left nothing to train?)")
        self.trainable_params = sum(p.numel() for p in trainable)
        optim = torch.optim.AdamW(trainable, lr=learner_cfg["lr"], weight_decay=learner_cfg["weight_decay"])
        ds_config = {
            "train_micro_batch_size_per_gpu": learner_cfg["micro_batch_size"],
            "gradient_accumulation_steps": micro_batches_per_step,
            "gradient_clipping": learner_cfg["grad_clip"],
            "zero_optimization": {"stage": learner_cfg["zero_stage"]},
            # A torch AdamW, not DeepSpeed's fused CPU Adam: that one compiles a C++ op at first start.
            "zero_allow_untested_optimizer": True,
            "bf16": {"enabled": dtype == "bfloat16"},
            "steps_per_print": 10**9,
        }
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optim, config=ds_config)
        self.device = self.engine.device
        if self.ref is not None:
            self.ref.to(self.device)
        self._cache: dict = {}
        return self.rank

    def _batches(self, items):
        from rlsys.sequences import build_batch

        mb = self.cfg["micro_batch_size"]
        for i in range(0, len(items), mb):
            inputs, targets, mask = build_batch(self.processor, items[i : i + mb], self.pad_id, self._cache)
            yield i, {k: v.to(self.device) for k, v in inputs.items()}, targets.to(self.device), mask.to(self.device)

    def logprobs(self, items) -> tuple[list, list]:
        """Per item, the current policy's (``old``) and the reference's log-probs of its answer."""
        import torch

        from rlsys.sequences import token_logprobs

        olds, refs = [], []
        self.engine.eval()
        with torch.no_grad():
            for _, inputs, targets, mask in self._batches(items):
                old, _ = token_logprobs(self.engine.module, inputs, targets, self.temperature)
                ref = token_logprobs(self.ref, inputs, targets, self.temperature)[0] if self.ref is not None else old
                for b in range(mask.shape[0]):
                    olds.append(old[b][mask[b]].cpu())
                    refs.append(ref[b][mask[b]].cpu())
        self._cache.clear()
        return olds, refs

    def train(self, items, num_tokens_global: int) -> dict:
        """One optimizer step over ``items`` (this rank's shard). Each item carries
        ``advantage``, ``old_logp`` and ``ref_logp`` (per answer token)."""
        import torch

        from rlsys.algorithm import policy_loss
        from rlsys.sequences import token_logprobs

        self.engine.train()
        t0 = time.perf_counter()
        sums: dict[str, float] = {}
        n_tok = 0
        for i, inputs, targets, mask in self._batches(items):
            chunk = items[i : i + mask.shape[0]]
            logp, entropy = token_logprobs(self.engine, inputs, targets, self.temperature)
            old = torch.zeros_like(logp)
            ref = torch.zeros_like(logp)
            for b, it in enumerate(chunk):
                old[b][mask[b]] = it["old_logp"].to(old)
                ref[b][mask[b]] = it["ref_logp"].to(ref)
            adv = torch.tensor([it["advantage"] for it in chunk], dtype=torch.float32, device=logp.device)
            loss, m = policy_loss(logp, old, ref, adv, mask, clip_low=self.cfg["clip_low"],
                                  clip_high=self.cfg["clip_high"], kl_coef=self.cfg["kl_coef"],
                                  num_tokens=num_tokens_global)
            # The loss is normalised by the global answer-token count, so micro-batch losses
            # add up to the step's loss; DeepSpeed must neither divide by the accumulation steps
            # (scale_wrt_gas=False) nor, net, by the world size it averages gradients over.
            self.engine.backward(loss * self.world, scale_wrt_gas=False)
            self.engine.step()
            k = int(m["num_tokens"])
            n_tok += k
            for name in ("kl", "clip_fraction", "ratio_mean"):
                sums[name] = sums.get(name, 0.0) + float(m[name]) * k
            sums["entropy"] = sums.get("entropy", 0.0) + float(entropy.detach()[mask].sum())
            sums["loss"] = sums.get("loss", 0.0) + float(loss.detach())
        out = {k: (v / max(n_tok, 1) if k != "loss" else v) for k, v in sums.items()}
        out.update(tokens=n_tok, learn_s=time.perf_counter() - t0,
                   lr=self.engine.get_lr()[0] if self.engine.get_lr() else self.cfg["lr"])
        return out

    def weight_buckets(self, bucket_bytes: int) -> list:
        """The policy's weights as safetensors buckets in the object store (rank 0)."""
        from actors.weight_sync import state_dict_buckets

        return [ray.put(b) for b in state_dict_buckets(self.engine.module.state_dict(), bucket_bytes)]

    def prompt_logprobs(self, prompt: str, image: str) -> tuple[list[int], list[float]]:
        """Log-prob of every prompt token after the first, as :meth:`RolloutWorker.prompt_logprobs`."""
        import torch

        from rlsys.sequences import encode_prompts

        enc = encode_prompts(self.processor, [{"prompt": prompt, "image": image}])[0]
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
        from actors.weight_sync import params_checksum

        return params_checksum(self.engine.module.named_parameters())

    def save(self, path: str, hf: bool) -> None:
        """DeepSpeed state (model, optimizer, per-rank) under path/ds; rank 0 also writes a Hugging
        Face directory under path/hf. The caller renames ``path`` into place (atomic)."""
        import torch

        self.engine.save_checkpoint(os.path.join(path, "ds"), tag="state",
                                    client_state={"torch_rng": torch.get_rng_state(), "py_rng": random.getstate()})
        if hf and self.rank == 0:
            self.engine.module.save_pretrained(os.path.join(path, "hf"), safe_serialization=True)
            self.processor.save_pretrained(os.path.join(path, "hf"))

    def load(self, path: str) -> None:
        import torch

        _, client = self.engine.load_checkpoint(os.path.join(path, "ds"), tag="state")
        if client:
            torch.set_rng_state(client["torch_rng"])
            random.setstate(client["py_rng"])
