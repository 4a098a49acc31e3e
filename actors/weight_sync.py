"""Weight transport from the learner to the vLLM generators, bucketed.

CPU / one node (and any Ray cluster): the learner serialises its full state dict into a few
safetensors buckets of at most ``bucket_bytes`` each and puts them in the Ray object store; each
generator actor fetches the buckets, writes each to shared memory (/dev/shm) and asks its vLLM
workers (``collective_rpc``) to load it with the model's own ``load_weights``. One RPC per bucket,
never one per tensor. Files, not tensors, cross the RPC because tensors passed as
``collective_rpc`` arguments did not arrive as tensors (GUIDE section 2).

GPUs: vLLM 0.32's weight-transfer API (``vllm.distributed.weight_transfer``, NCCL engine) moves
tensors device to device; :class:`VllmWorkerExtension` is where that hook lives on the worker
side. It is written against the documented API and has not run here (no GPU on CI).

The extension's methods are prefixed ``rlsys_`` because vLLM's worker already defines
``update_weights``.
"""

from __future__ import annotations

import hashlib
import os
import tempfile

DEFAULT_BUCKET_BYTES = 256 << 20


def state_dict_buckets(state_dict, bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> list[bytes]:
    """Serialise ``name -> tensor`` into safetensors blobs of at most ~``bucket_bytes`` each."""
    from safetensors.torch import save

    buckets, cur, size = [], {}, 0
    for name, t in state_dict.items():
        t = t.detach().contiguous().cpu()
        nbytes = t.numel() * t.element_size()
        if cur and size + nbytes > bucket_bytes:
            buckets.append(save(cur))
            cur, size = {}, 0
        cur[name] = t
        size += nbytes
    if cur:
        buckets.append(save(cur))
    return buckets


def params_checksum(named_params) -> dict:
    """Order-independent checksum: float64 sum, sum of squares and element count over all
    parameters. vLLM fuses q/k/v and gate/up projections into single tensors, so per-name
    hashes cannot match the learner's; sums over concatenations do."""
    import torch

    total = torch.zeros((), dtype=torch.float64)
    sq = torch.zeros((), dtype=torch.float64)
    n = 0
    for _, p in named_params:
        p64 = p.detach().to(torch.float64)
        total += p64.sum()
        sq += (p64 * p64).sum()
        n += p.numel()
    return {"sum": float(total), "sum_sq": float(sq), "numel": int(n)}


def write_shm(blob: bytes) -> str:
    """Write a blob to shared memory (falls back to the temp dir) and return its path."""
    d = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    fd, path = tempfile.mkstemp(prefix="rlsys-w-", suffix=".safetensors", dir=d)
    with os.fdopen(fd, "wb") as f:
        f.write(blob)
    return path


class VllmWorkerExtension:
    """Mixed into vLLM's worker (``worker_extension_cls``); runs in the worker process."""

    def rlsys_load_weights_files(self, paths: list[str]) -> int:
        """Load every bucket in one in-place reload. vLLM's layerwise reload finalises a layer
        once its weights have arrived and expects the full set in one call, so the buckets are
        chained into one iterator rather than loaded call by call."""
        from safetensors import safe_open

        received = []

        def weights():
            for path in paths:
                with safe_open(path, framework="pt") as f:
                    for name in f.keys():
                        t = f.get_tensor(name)
                        received.append((name, t))
                        yield name, t

        self.model_runner.reload_weights(weights_iterator=weights())
        self._rlsys_received = params_checksum(received)
        return len(received)

    def rlsys_checksum(self) -> dict | None:
        """Checksum of the weights this worker last loaded, as received (None before any sync).
        The engine's own parameters cannot be summed instead: on CPUs vLLM repacks linear
        weights into oneDNN buffers and leaves the ``weight`` parameters empty; that the
        engine *computes* with the new weights is checked by comparing log-probs
        (:meth:`actors.rollout.RolloutWorker.prompt_logprobs`)."""
        return getattr(self, "_rlsys_received", None)

    # GPU path: vLLM's NCCL weight-transfer engine. The learner's rank 0 joins a process group
    # with every engine's workers and broadcasts bucket by bucket; see vLLM's
    # ``vllm.distributed.weight_transfer`` (start_weight_update / finish_weight_update).
    def rlsys_start_nccl_update(self, init_info: dict) -> None:  # pragma: no cover - GPU only
        self.start_weight_update(init_info)

    def rlsys_finish_nccl_update(self) -> None:  # pragma: no cover - GPU only
        self.finish_weight_update()


def digest(blobs) -> str:
    h = hashlib.sha256()
    for b in blobs:
        h.update(b)
    return h.hexdigest()[:16]
