"""Weight transfer from the learner to the vLLM generators: vLLM's own four-phase protocol.

vLLM 0.32 ships RL weight transfer as a protocol (``vllm.distributed.weight_transfer``): the
engine is started with ``weight_transfer_config=WeightTransferConfig(backend=...)``; its workers
then take ``init_weight_transfer_engine(init_info)`` once, and per update
``start_weight_update()`` -> ``update_weights(update_info)`` (concurrently with the trainer's
send) -> ``finish_weight_update()``. The trainer side is a ``TrainerWeightTransferEngine`` made by
``WeightTransferTrainerFactory.trainer_init(init_info, client=..., source=...)`` whose
``send_weights()`` drives that round trip through a client. rlsys uses it as is:

- GPUs: the built-in ``nccl`` backend. Learner rank 0 is NCCL rank 0 and broadcasts packed
  buckets (``packed_buffer_size_bytes``) to every worker of every engine in one group.
- CPUs: ``rlsys_gloo``, defined here and registered in both factories: the same shape over a
  gloo process group of its own (a TCPStore rendezvous, not the default group, which DeepSpeed
  and vLLM each hold), packed uint8 buckets broadcast from rank 0 and loaded through vLLM's
  layerwise reload exactly as the NCCL engine does. The controller's sync code is one path; only
  the backend name changes.

:class:`EngineGroupClient` is the trainer's client over a rollout group: it gives engine ``k``
the rank offset ``1 + k x workers_per_engine`` (vLLM's own Ray client gives every actor the same
offset, which suits data-parallel replicas of one engine, not independent engines), runs each
phase on all engines at once and bounds every phase with a timeout.

The equality check (:func:`compare_digests`) compares the same tensors on both sides: the learner
digests what its ``WeightSource`` yields (``named_parameters``: a tied embedding once), the
worker what it received, name by name.

``object_store`` stays as a named fallback, for an engine started without a weight-transfer
config (an older vLLM, a backend that cannot join the learner's network): safetensors buckets
through Ray's object store into /dev/shm, one RPC per bucket. It is what the benchmark compares
the protocol against.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass
from typing import ClassVar

from actors.group import call_each, wait_members
from actors.weight_digest import (  # noqa: F401
    DIGEST_CHUNK_ELEMENTS,
    _dtype,
    _numel,
    checksum_of,
    compare_digests,
    pack,
    params_checksum,
    plan_buckets,
    tensor_digest,
    unpack,
)

log = logging.getLogger(__name__)

DEFAULT_BUCKET_BYTES = 256 << 20
GLOO_BACKEND = "rlsys_gloo"
BACKENDS = ("nccl", GLOO_BACKEND, "object_store")


def gloo_group(host: str, port: int, rank: int, world_size: int, timeout_s: float):
    """A gloo process group of its own over a TCPStore (rank 0 hosts the store). Independent of
    ``torch.distributed``'s default group, which DeepSpeed (learner) and vLLM (worker) own."""
    from datetime import timedelta

    import torch.distributed as dist

    store = dist.TCPStore(host, port, world_size, is_master=rank == 0, timeout=timedelta(seconds=timeout_s))
    return dist.ProcessGroupGloo(store, rank, world_size, timedelta(seconds=timeout_s))


def _broadcast(pg, tensor) -> None:
    import torch.distributed as dist

    opts = dist.BroadcastOptions()
    opts.rootRank = 0
    pg.broadcast([tensor], opts).wait()


# ----------------------------------------------------------------------------------------------
# The rlsys_gloo backend, in vLLM's protocol (worker side and trainer side)
# ----------------------------------------------------------------------------------------------
def _vllm_base():
    from vllm.distributed.weight_transfer.base import (
        TrainerInitInfo,
        TrainerWeightTransferEngine,
        WeightTransferEngine,
        WeightTransferInitInfo,
        WeightTransferUpdateInfo,
    )

    return (
        TrainerInitInfo,
        TrainerWeightTransferEngine,
        WeightTransferEngine,
        WeightTransferInitInfo,
        WeightTransferUpdateInfo,
    )


try:  # vLLM is an optional import for the pure helpers above (tests of packing need no vLLM)
    (_TrainerInitInfo, _TrainerEngine, _WorkerEngine, _WorkerInitInfo, _UpdateInfo) = _vllm_base()
except ImportError:  # pragma: no cover - vLLM is installed everywhere rlsys runs actors
    _TrainerInitInfo = _TrainerEngine = _WorkerEngine = _WorkerInitInfo = _UpdateInfo = None  # type: ignore


if _WorkerEngine is not None:

    @dataclass
    class GlooWorkerInitInfo(_WorkerInitInfo):
        master_address: str
        master_port: int
        rank_offset: int
        world_size: int
        bucket_bytes: int = DEFAULT_BUCKET_BYTES
        timeout_s: float = 600.0

    @dataclass
    class GlooUpdateInfo(_UpdateInfo):
        names: list[str]
        dtype_names: list[str]
        shapes: list[list[int]]

        def __post_init__(self):
            if not (len(self.names) == len(self.dtype_names) == len(self.shapes)):
                raise ValueError(
                    f"update_info lists differ in length: names {len(self.names)}, "
                    f"dtype_names {len(self.dtype_names)}, shapes {len(self.shapes)}"
                )

    class GlooWeightTransferEngine(_WorkerEngine):
        """Worker side of ``rlsys_gloo``: receive packed buckets by gloo broadcast from the
        trainer (rank 0) and load them through vLLM's layerwise reload, as the NCCL engine does."""

        init_info_cls = GlooWorkerInitInfo
        update_info_cls = GlooUpdateInfo
        supports_draft_weight_update = False

        def __init__(self, config, vllm_config, device, model):
            super().__init__(config, vllm_config, device, model)
            self.group = None
            self.bucket_bytes = DEFAULT_BUCKET_BYTES

        def init_transfer_engine(self, init_info) -> None:
            pc = self.parallel_config
            rank = init_info.rank_offset + pc.data_parallel_index * pc.world_size + pc.rank
            self.bucket_bytes = init_info.bucket_bytes
            self.group = gloo_group(
                init_info.master_address, init_info.master_port, rank, init_info.world_size, init_info.timeout_s
            )

        def start_weight_update(self) -> None:
            from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

            initialize_layerwise_reload(self.model)

        def receive_weights(self, update_info) -> None:
            import torch

            if self.group is None:
                raise RuntimeError("rlsys_gloo weight transfer not initialised: call init_weight_transfer_engine first")
            meta = [
                (n, _dtype(d), tuple(s))
                for n, d, s in zip(update_info.names, update_info.dtype_names, update_info.shapes)
            ]
            for idx in plan_buckets(meta, self.bucket_bytes):
                part = [meta[i] for i in idx]
                buf = torch.empty(
                    sum(_numel(s) * torch.empty((), dtype=d).element_size() for _, d, s in part), dtype=torch.uint8
                )
                _broadcast(self.group, buf)
                self.model.load_weights(unpack(buf, part))

        def finish_weight_update(self) -> None:
            from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

            finalize_layerwise_reload(self.model, self.model_config)

        def update_weights(self, update_info: dict) -> None:
            # the base class synchronises the accelerator afterwards, which a CPU-only torch lacks
            self.receive_weights(self.parse_update_info(update_info))

        def shutdown(self) -> None:
            self.group = None  # the store and the gloo context close with their last reference

    @dataclass
    class GlooTrainerInitInfo(_TrainerInitInfo):
        backend: ClassVar[str] = GLOO_BACKEND
        master_address: str
        master_port: int
        world_size: int
        bucket_bytes: int = DEFAULT_BUCKET_BYTES
        timeout_s: float = 600.0

    class GlooTrainerWeightTransferEngine(_TrainerEngine):
        """Trainer side of ``rlsys_gloo``: rank 0 hosts the rendezvous and broadcasts buckets."""

        init_info_cls = GlooTrainerInitInfo

        def __init__(self, *, client, source, is_sender=True, bucket_bytes=DEFAULT_BUCKET_BYTES):
            super().__init__(client=client, source=source, is_sender=is_sender)
            self.bucket_bytes = bucket_bytes
            self.group = None

        @classmethod
        def trainer_init(cls, init_info, *, client, source=None):
            from concurrent.futures import ThreadPoolExecutor

            if source is None:
                raise ValueError("rlsys_gloo trainer weight transfer needs a WeightSource")
            engine = cls(
                client=client, source=source, is_sender=init_info.is_sender, bucket_bytes=init_info.bucket_bytes
            )
            if not engine.is_sender:
                return engine
            worker_info = {
                "master_address": init_info.master_address,
                "master_port": init_info.master_port,
                "rank_offset": 1,
                "world_size": init_info.world_size,
                "bucket_bytes": init_info.bucket_bytes,
                "timeout_s": init_info.timeout_s,
            }
            # the workers block in the rendezvous inside init_weight_transfer_engine: join concurrently
            with ThreadPoolExecutor(max_workers=1) as exe:
                fut = exe.submit(client.init_weight_transfer_engine, worker_info)
                engine.group = gloo_group(
                    init_info.master_address, init_info.master_port, 0, init_info.world_size, init_info.timeout_s
                )
                fut.result()
            return engine

        def send_weights(self) -> None:
            from concurrent.futures import ThreadPoolExecutor

            meta = [(m.name, m.dtype, tuple(m.shape)) for m in self.source.metadata()]
            if not self.is_sender:
                return
            update_info = {
                "names": [m[0] for m in meta],
                "dtype_names": [str(m[1]).split(".")[-1] for m in meta],
                "shapes": [list(m[2]) for m in meta],
            }
            t = {"t0": time.perf_counter()}
            self.client.start_weight_update()
            t["start"] = time.perf_counter()
            exe = ThreadPoolExecutor(max_workers=1)
            try:
                fut = exe.submit(self.client.update_weights, update_info)
                tensors = dict(iter(self.source))
                for idx in plan_buckets(meta, self.bucket_bytes):
                    if fut.done():  # the workers refused the update: do not wait in a broadcast for them
                        fut.result()
                    _broadcast(self.group, pack([tensors[meta[i][0]] for i in idx]))
                t["broadcast"] = time.perf_counter()
                fut.result()
                t["update"] = time.perf_counter()
            finally:
                exe.shutdown(wait=False)  # a failed broadcast leaves the RPC thread blocked; never join it
            self.client.finish_weight_update()
            t["finish"] = time.perf_counter()
            keys = ["t0", "start", "broadcast", "update", "finish"]
            self.timing = {f"{b}_s": t[b] - t[a] for a, b in zip(keys, keys[1:])}

        def shutdown(self) -> None:
            self.group = None


def register_backends() -> None:
    """Register ``rlsys_gloo`` in vLLM's two factories (idempotent). Runs on import of this
    module, which vLLM's workers import for the worker extension before they load the model."""
    try:
        from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory, WeightTransferTrainerFactory
    except ImportError:  # pragma: no cover
        return
    if GLOO_BACKEND not in WeightTransferEngineFactory._registry:
        WeightTransferEngineFactory.register_engine(GLOO_BACKEND, __name__, "GlooWeightTransferEngine")
    if GLOO_BACKEND not in WeightTransferTrainerFactory._registry:
        WeightTransferTrainerFactory.register_engine(GLOO_BACKEND, __name__, "GlooTrainerWeightTransferEngine")


register_backends()


# vLLM's layerwise reload warns "<Layer>: Failed to load weights" for every layer that has
# tensors but got none in an update. For these layers that is expected on every push: rotary
# embeddings and the image-normalisation op (FusedMMInputNorm) hold computed buffers that no
# checkpoint has, and with tied embeddings the output head is the input embedding, sent once under
# its name. vLLM then keeps the layer's tensors, which is right. Three such lines per sync read as
# failures, so they are dropped here; any other layer's warning passes, and the equality check
# (compare_digests) still compares every tensor that was sent.
EXPECTED_UNLOADED_LAYERS = frozenset({"RotaryEmbedding", "MRotaryEmbedding", "FusedMMInputNorm", "ParallelLMHead"})


class _ExpectedUnloadedLayers(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg == "%s: Failed to load weights" and record.args and record.args[0] in EXPECTED_UNLOADED_LAYERS:
            return False
        return True


def quiet_expected_reload_warnings() -> None:
    """Install the filter above on vLLM's reload logger (idempotent; in the worker process, where
    vLLM imports this module for the worker extension)."""
    lg = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
    if not any(isinstance(f, _ExpectedUnloadedLayers) for f in lg.filters):
        lg.addFilter(_ExpectedUnloadedLayers())


quiet_expected_reload_warnings()


def trainer_init_info(
    backend: str,
    *,
    master_address: str,
    master_port: int,
    world_size: int,
    bucket_bytes: int,
    timeout_s: float,
    rank: int = 0,
):
    """The trainer-side init info of ``backend`` (vLLM's dataclass for ``nccl``)."""
    if backend == GLOO_BACKEND:
        return GlooTrainerInitInfo(
            master_address=master_address,
            master_port=master_port,
            world_size=world_size,
            bucket_bytes=bucket_bytes,
            timeout_s=timeout_s,
            rank=rank,
        )
    if backend == "nccl":  # pragma: no cover - GPU only
        from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo

        return NCCLTrainerInitInfo(
            master_address=master_address,
            master_port=master_port,
            world_size=world_size,
            packed=True,
            packed_buffer_size_bytes=bucket_bytes,
            rank=rank,
        )
    raise ValueError(f"weight transfer backend {backend!r} has no trainer side (choose one of {BACKENDS[:2]})")


class EngineGroupClient:
    """``VLLMWeightSyncClient`` over several independent engine actors (a rollout group).

    Each phase runs on every engine at once and waits at most ``timeout_s``; engine ``k``'s
    workers take transfer ranks ``1 + k * workers_per_engine ...`` (rank 0 is the trainer)."""

    def __init__(self, handles: list, workers_per_engine: int, timeout_s: float):
        self.handles, self.per, self.timeout_s = list(handles), workers_per_engine, timeout_s

    def _all(self, what: str, refs):
        call_each("rollout", refs, self.timeout_s, f"weight transfer {what}")

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        self._all(
            "init_weight_transfer_engine",
            [
                h.init_weight_transfer_engine.remote(
                    {**init_info, "rank_offset": init_info["rank_offset"] + k * self.per}
                )
                for k, h in enumerate(self.handles)
            ],
        )

    def start_weight_update(self) -> None:
        self._all("start_weight_update", [h.start_weight_update.remote() for h in self.handles])

    def update_weights(self, update_info) -> None:
        self._all("update_weights", [h.update_weights.remote(update_info) for h in self.handles])

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self._all("finish_weight_update", [h.finish_weight_update.remote(weight_version) for h in self.handles])

    def shutdown_weight_transfer_engine(self) -> None:
        self._all("shutdown_weight_transfer_engine", [h.shutdown_weight_transfer_engine.remote() for h in self.handles])


def tensors_source(make, shapes):
    """vLLM's ``WeightSource`` over ``make()``, a fresh ``(name, tensor)`` iterator each pass: what
    a learner sends when it is not its module's parameters (a LoRA learner's merged layers).
    ``shapes()`` gives ``(name, dtype, shape)`` of the same tensors without making them (a sync
    asks for them first, and making a merged weight is the expensive part). The rest of the
    interface (held names, groups) is vLLM's default over these."""
    from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource

    class TensorsSource(WeightSource):
        def metadata(self):
            return [ParamMeta(n, d, s) for n, d, s in shapes()]

        def __iter__(self):
            return iter(make())

    return TensorsSource()


class LearnerWeightSender:
    """Lives in learner rank 0: the trainer-side engine over ``named_parameters`` (a tied
    embedding is one parameter, sent once; vLLM's loader ties it on the other side)."""

    def __init__(self, module, backend: str, source=None):
        # source: what to send (a WeightSource); None: the module's parameters
        self.module, self.backend, self.engine, self.source = module, backend, None, source

    def connect(
        self,
        handles: list,
        workers_per_engine: int,
        *,
        master_address: str,
        master_port: int,
        bucket_bytes: int,
        timeout_s: float,
    ) -> float:
        from vllm.distributed.weight_transfer.base import ModuleSource
        from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory

        self.close()
        t0 = time.perf_counter()
        info = trainer_init_info(
            self.backend,
            master_address=master_address,
            master_port=master_port,
            world_size=1 + len(handles) * workers_per_engine,
            bucket_bytes=bucket_bytes,
            timeout_s=timeout_s,
        )
        client = EngineGroupClient(handles, workers_per_engine, timeout_s)
        source = self.source if self.source is not None else ModuleSource(self.module)
        self.engine = WeightTransferTrainerFactory.trainer_init(info, client=client, source=source)
        return time.perf_counter() - t0

    def send(self) -> float:
        if self.engine is None:
            raise RuntimeError("weight transfer: send before connect")
        t0 = time.perf_counter()
        self.engine.send_weights()
        return time.perf_counter() - t0

    def close(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None


# ----------------------------------------------------------------------------------------------
# Fallback transport (object store + /dev/shm) and the worker extension
# ----------------------------------------------------------------------------------------------
def state_dict_buckets(named_tensors, bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> list[bytes]:
    """Serialise ``(name, tensor)`` pairs into safetensors blobs of at most ~``bucket_bytes`` each."""
    from safetensors.torch import save

    buckets, cur, size = [], {}, 0
    for name, t in named_tensors:
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


def write_shm(blob: bytes) -> str:
    """Write a blob to shared memory (falls back to the temp dir) and return its path."""
    d = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    fd, path = tempfile.mkstemp(prefix="rlsys-w-", suffix=".safetensors", dir=d)
    with os.fdopen(fd, "wb") as f:
        f.write(blob)
    return path


def tied_heads(model) -> list:
    """``(head, embedding)`` module pairs of a loaded vLLM model whose output head shares the
    embedding's weight tensor without being the embedding module (vLLM's ``tie_weights``)."""
    embeds = {id(m.weight): m for m in model.modules() if type(m).__name__ == "VocabParallelEmbedding"}
    return [
        (m, embeds[id(m.weight)])
        for m in model.modules()
        if type(m).__name__ == "ParallelLMHead" and id(getattr(m, "weight", None)) in embeds
    ]


class VllmWorkerExtension:
    """Mixed into vLLM's worker (``worker_extension_cls``); runs in the worker process. Its
    methods are prefixed ``rlsys_`` because vLLM's worker already defines ``update_weights``."""

    def rlsys_track_received(self) -> None:
        """Digest every tensor the model's ``load_weights`` is given, whichever path gives it
        (the protocol's backends, nccl included, and the fallback's reload all load through it),
        so the equality check reads what arrived. Installed once, after the model is loaded."""
        model = self.model_runner.get_model()
        if getattr(model, "_rlsys_tracked", False):
            return
        original = model.load_weights
        self._rlsys_pending = []

        def load_weights(weights, *args, **kwargs):
            def seen():
                for name, t in weights:
                    self._rlsys_pending.append((name, tensor_digest(t)))
                    yield name, t

            return original(seen(), *args, **kwargs)

        model.load_weights = load_weights
        model._rlsys_tracked = True
        self._rlsys_tied = tied_heads(model)

    def _rlsys_retie(self) -> int:
        """Refresh each output head tied to its input embedding after an update. Where the head
        is the embedding module itself (Qwen2.5-VL's language model in vLLM) the reload handles
        it; where it is its own module sharing the embedding's parameter (Qwen3-VL's
        ``lm_head.tie_weights``) it receives no weights (a tied head is sent once, under the
        embedding's name), so vLLM's layerwise reload never post-processes it: on CPUs its packed
        GEMM copy stayed the old weights and the engine sampled from the new body and the old
        head (0.63 nats apart after one noisy update of a tiny Qwen3-VL; the digest check, which
        reads what arrived, cannot see it). The tie is restored if the reload gave the embedding
        a new tensor, and the head post-processed again."""
        for head, embed in getattr(self, "_rlsys_tied", ()):
            if head.weight is not embed.weight:
                head.quant_method.tie_weights(head, embed)
            head.quant_method.process_weights_after_loading(head)
        return len(getattr(self, "_rlsys_tied", ()))

    def _rlsys_commit_received(self) -> None:
        self._rlsys_received = checksum_of(dict(getattr(self, "_rlsys_pending", [])))
        self._rlsys_pending = []

    def rlsys_load_weights_files(self, paths: list[str]) -> int:
        """The fallback: load every safetensors bucket in one in-place reload (vLLM's layerwise
        reload finalises a layer once its weights have arrived, so the buckets are chained into
        one iterator)."""
        from safetensors import safe_open

        def weights():
            for path in paths:
                with safe_open(path, framework="pt") as f:
                    for name in f.keys():
                        yield name, f.get_tensor(name)

        self._rlsys_pending = []
        self.model_runner.reload_weights(weights_iterator=weights())
        self._rlsys_retie()
        self._rlsys_commit_received()
        return len(self._rlsys_received["per_name"])

    def rlsys_after_weight_update(self) -> None:
        """After the protocol's finish: clear state computed from the old weights (the finish
        does not reset the model runner's encoder and multi-modal caches; reload_weights does)
        and keep the digest of what arrived."""
        self._rlsys_retie()
        self.model_runner.reset_encoder_cache()
        self.model_runner.reset_mm_cache()
        self._rlsys_commit_received()

    def rlsys_checksum(self) -> dict | None:
        """Digest of the weights this worker last received, per name (None before any). The
        engine's own parameters cannot be summed instead: on CPUs vLLM repacks linear weights
        into oneDNN buffers and leaves the ``weight`` parameters empty; that the engine
        *computes* with the new weights is checked by comparing log-probs."""
        return getattr(self, "_rlsys_received", None)


class WeightSync:
    """Driver side of a sync: the learner group's rank 0 sends, the rollout group's engines
    receive. With the protocol, the transfer group is opened once and reopened only when an
    engine was restarted (its workers were members); ``object_store`` is the fallback."""

    def __init__(self, learners, rollouts, backend: str, bucket_bytes: int, timeout_s: float):
        if backend not in BACKENDS:
            raise ValueError(f"unknown weight transfer backend {backend!r}; choose one of {BACKENDS}")
        self.learners, self.rollouts, self.backend = learners, rollouts, backend
        self.bucket_bytes, self.timeout_s = bucket_bytes, timeout_s
        self._members: list | None = None  # engine handles of the open transfer group
        self.connects = 0
        self.last: dict = {}

    def push(self) -> float:
        """The learner's current weights into every engine; returns seconds."""

        t0 = time.perf_counter()
        if self.backend == "object_store":
            buckets = self.learners.weight_buckets(self.bucket_bytes)
            call_each(
                "rollout",
                [e.load_weight_buckets.remote(*buckets) for e in self.rollouts.engines],
                self.timeout_s,
                "weight load into vLLM",
            )
            self.last = {"connect_s": 0.0, "send_s": time.perf_counter() - t0}
            return self.last["send_s"]
        engines = list(self.rollouts.engines)
        connect_s = 0.0
        if self._members is None or any(a is not b for a, b in zip(self._members, engines)):
            self._close_survivors(engines)
            connect_s = self.learners.connect_weights(
                engines, self.rollouts.transfer_workers(), self.backend, self.bucket_bytes, self.timeout_s
            )
            self._members = engines
            self.connects += 1
        send_s = self.learners.send_weights(self.timeout_s)
        self.last = {"connect_s": connect_s, "send_s": send_s}
        return time.perf_counter() - t0

    def _close_survivors(self, engines: list) -> None:
        """Engines still alive from the previous group leave it before the new one opens."""
        if self._members is None:
            return
        refs = {
            k: a.shutdown_weight_transfer_engine.remote()
            for k, (a, b) in enumerate(zip(self._members, engines))
            if a is b
        }
        for r in wait_members("rollout", refs, min(self.timeout_s, 60.0), "leaving the old transfer group").values():
            if isinstance(r, Exception):  # it leaves with its group when it is next restarted
                log.warning("weight transfer: %s", r)
