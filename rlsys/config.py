"""The one typed configuration schema. YAML files in ``configs/`` only supply values.

Every field has a docstring and a range; units are in the names (``prompts_per_step``,
``samples_per_prompt``, ``timeout_s``). Totals are derived, never asked for: see
:meth:`GRPOConfig.totals`, printed at start. Entry points call :func:`load_config` before
importing Ray, vLLM or DeepSpeed, so a bad value fails in a second with the field's path.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from rlsys.lang.format import KEYPOINT_STYLES
from rlsys.lang.prompts import PROMPT_SETS
from rlsys.lang.vocab import MASK_VOCABULARIES, VOCABULARIES, model_tokens
from rlsys.models import TinySpec, qwen2_5_vl_3b_shaped, qwen3_vl_4b_shaped

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SERVE_CONFIG = REPO_ROOT / "configs" / "serve_tiny_cpu.yaml"
DEFAULT_CONFIG = REPO_ROOT / "configs" / "tiny_cpu.yaml"


def _zero_stage_supported(stage: int) -> int:
    # ZeRO-3 partitions the parameters themselves: every rank holds a shard and
    # named_parameters()/state_dict() return empty placeholders outside a gather, so the weight
    # export, the Hugging Face checkpoint and the checksum would see empty tensors. rlsys does not
    # gather them (GatheredParameters around each), so it refuses stage 3.
    if stage == 3:
        raise ValueError(
            "zero_stage 3 is not supported: ZeRO-3 partitions the parameters, so weight export, "
            "checkpoints and checksums would read empty tensors; use 2 (gradients and optimizer "
            "state partitioned, parameters whole on every rank)"
        )
    if not 0 <= stage <= 2:
        raise ValueError(f"zero_stage must be 0, 1 or 2, got {stage}")
    return stage


ZeroStage = Annotated[int, AfterValidator(_zero_stage_supported)]

# The one pixel budget of a config (GRPO's and SFT's model section, Serve's): the image
# processor resizes every image into [min_pixels, max_pixels] (Qwen2.5-VL: one image token per
# 28 x 28 px), and SFT, the learner, the vLLM engines and Serve all use the same budget, so
# the image tokens the engine saw are the ones the learner scores.
MinPixels = Annotated[
    int | None,
    Field(
        ge=28 * 28,
        description="Smallest image area after resizing, in pixels (28 x 28 px per image token). None: the checkpoint's processor setting (Qwen2.5-VL: 3,136).",
    ),
]
MaxPixels = Annotated[
    int | None,
    Field(
        ge=28 * 28,
        description="Largest image area after resizing, in pixels: caps an image at max_pixels / 784 tokens (Rex-Omni: 2,560 tokens = 2,007,040 px). None: the checkpoint's processor setting (Qwen2.5-VL: 12,845,056, i.e. 16,384 tokens).",
    ),
]


# vLLM's KV cache. On GPUs a share of device memory is the usual knob. On the CPU backend
# gpu_memory_utilization is a share of the RAM of the engine's NUMA node (weights and
# activations included), which is fragile: on a 24 GB VM whose node 0 reports 12 GB, 0.1 leaves
# nothing once the worker's own 1.2 GB are counted, and the engine refuses to start. A size in
# MiB is what CPU configs set.
KvCacheMiB = Annotated[
    int | None,
    Field(
        ge=16,
        description="vLLM KV-cache size in MiB (vLLM's kv_cache_memory_bytes); when set, gpu_memory_utilization no longer sizes the cache. Set it on CPU machines (the tiny configs use 256: the tiny model needs ~1 KiB per token). None: gpu_memory_utilization decides.",
    ),
]


# The names come from the vocabulary table (rlsys/lang/vocab/__init__.py), not a second list.
VocabularyName = Literal[VOCABULARIES]
PromptSetName = Literal[tuple(PROMPT_SETS)]
PROMPT_SET_HELP = (
    "The questions' wording and system prompt (rlsys.lang.prompts): paper, the Rex-Omni paper's table 1 "
    "with paraphrases drawn in training; rex_release, the released Rex-Omni's inference wording (one "
    "question per task, its system prompt, visual-prompt boxes in its JSON, encoded by floor), what a "
    "release checkpoint was trained to read. SFT, GRPO, eval and Serve of one model use the same."
)
# the released Rex-Omni decodes with this penalty (its wrapper); 1.0 is none
RELEASE_REPETITION_PENALTY = 1.05
RepetitionPenalty = Annotated[
    float,
    Field(
        ge=1.0,
        le=2.0,
        description="vLLM repetition penalty (1.0: none; the released Rex-Omni decodes with 1.05). Divides the "
        "logits of tokens already in the prompt or answer.",
    ),
]


def engine_memory(gpu_memory_utilization: float, kv_cache_mib: int | None) -> dict:
    """The vLLM engine arguments that size its memory (one rule for rollout, eval and Serve)."""
    out = {"gpu_memory_utilization": gpu_memory_utilization}
    if kv_cache_mib is not None:
        out["kv_cache_memory_bytes"] = kv_cache_mib << 20
    return out


def vllm_engine_args(model, model_dir: str, engine, *, seed: int) -> dict:
    """The one set of vLLM engine arguments, for the rollout engines, eval, Serve and the benches.
    ``model``: a :class:`ModelConfig`; ``engine``: a section with ``max_model_len_tokens``,
    ``gpu_memory_utilization``, ``kv_cache_mib``, ``enforce_eager`` and optionally
    ``max_num_seqs`` (the rollout section, or Serve's engine section). The engines see images
    under the model's pixel budget, as the learner's processor does, in the learner's dtype."""
    args = {
        "model": model_dir,
        "max_model_len": engine.max_model_len_tokens,
        **engine_memory(engine.gpu_memory_utilization, engine.kv_cache_mib),
        "enforce_eager": engine.enforce_eager,
        "seed": seed,
        "dtype": model.dtype,
        "limit_mm_per_prompt": {"image": 1, "video": 0},
        "mm_processor_kwargs": model.pixel_budget() or None,
        "trust_remote_code": model.trust_remote_code,
    }
    if getattr(engine, "max_num_seqs", None) is not None:
        args["max_num_seqs"] = engine.max_num_seqs
    return args


def prepare_sync_engine_process() -> None:
    """Process settings for a vLLM ``LLM`` (the synchronous engine: rollouts, eval, benches)
    built in this process, before it is built. vLLM is told to spawn its processes, not fork
    them (fork inside a Ray worker is unsafe). On a machine without a GPU the engine runs in this
    process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``: vLLM's in-process client and its
    single-process executor): by default vLLM's CPU platform starts an engine-core process and a
    worker process, each importing torch and vLLM again, about 30 s of a 2-core machine per
    engine start (a GRPO run's actors ready in 61 s against 102 s, measured side by side). On
    GPUs vLLM's own processes stay (the engine core overlaps scheduling with the model). A value
    already in the environment wins. Serve's ``AsyncLLM`` needs the processes: not for it."""
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def deepspeed_config(
    *, micro_batch_size: int, grad_clip: float, zero_stage: int, dtype: str, gradient_accumulation_steps: int = 1
) -> dict:
    """The one DeepSpeed config, for the GRPO learner and SFT. A torch AdamW is passed in, not
    DeepSpeed's fused CPU Adam (which compiles a C++ op at first start)."""
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": gradient_accumulation_steps,
        "gradient_clipping": grad_clip,
        "zero_optimization": {"stage": zero_stage},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": dtype == "bfloat16"},
        "steps_per_print": 10**9,
    }


def pixel_budget(min_pixels: int | None, max_pixels: int | None) -> dict:
    """The processor keyword arguments (and vLLM ``mm_processor_kwargs``) of a pixel budget."""
    if min_pixels is not None and max_pixels is not None and min_pixels > max_pixels:
        raise ValueError(f"min_pixels ({min_pixels}) exceeds max_pixels ({max_pixels})")
    return {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    path: str | None = Field(
        None,
        description="Local Hugging Face checkpoint directory. None: build (once) the tiny random-weight model (model.tiny_family) under run.out_dir/tiny-model.",
    )
    prompt_set: PromptSetName = Field("paper", description=PROMPT_SET_HELP)
    vocabulary: VocabularyName = Field(
        "rex_bins",
        description="How the model writes geometry (rlsys.lang.vocab): rex_bins, Rex-Omni's coordinate tokens <0>..<999>; qwen_json, Qwen2.5-VL's own grounding JSON (bbox_2d / point_2d in pixels of the resized image), what a base Qwen2.5-VL already answers; qwen3_json, Qwen3-VL's (the same JSON on a 0..1000 grid relative to the image); getok, GETok's grid tokens <gridX_Y> with offset tokens <OFFdx_dy> and <DELETE>; chatrex, ChatRex's proposal indices <obj0>.. into candidate boxes listed in the question. Used by SFT targets, questions, rewards, eval and Serve.",
    )
    getok_grid: int = Field(
        32,
        ge=2,
        le=256,
        description="vocabulary=getok: cells per image side (the paper's 32); getok_grid² + 10 tokens are added to a base checkpoint.",
    )
    chatrex_max_proposals: int = Field(
        100,
        ge=1,
        le=1000,
        description="vocabulary=chatrex: index tokens <obj0>..<objK-1> added (ChatRex keeps at most 100 boxes); a sample with more proposals is refused.",
    )
    chatrex_proposals: Literal["record", "synthetic"] = Field(
        "record",
        description="vocabulary=chatrex: where a sample's candidate boxes come from: its record's 'proposals' (python -m rlsys.data.proposals merges a file of boxes per image), or synthetic (its GT boxes jittered plus chatrex_distractors random boxes; for synthetic data only, as it leaks where the objects are).",
    )
    chatrex_distractors: int = Field(
        5,
        ge=0,
        le=100,
        description="vocabulary=chatrex, chatrex_proposals=synthetic: random boxes added to the jittered GT boxes.",
    )
    getok_offsets: bool = Field(
        True,
        description="vocabulary=getok: SFT targets put an offset token after every grid token (a 3·getok_grid lattice); off: grid tokens alone, the paper's first stage. Answers are read either way.",
    )
    coord_tokens: Literal["add", "map_last"] = Field(
        "add",
        description="For a base Qwen2.5-VL without its vocabulary's tokens: add them to the vocabulary, or (rex_bins only) map <0>..<999> onto the last 1,000 BPE rows below the added tokens (150643..151642 on Qwen2.5-VL), the released Rex-Omni's ids.",
    )
    trust_remote_code: bool = Field(
        False,
        description="Allow a checkpoint's own Python code. Off: our loaders need only the Qwen2.5-VL classes in transformers.",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Learner parameter dtype (float32 on CPUs)."
    )
    tiny_hidden_size: int = Field(
        128, ge=64, description="Tiny model (path None): LLM width; head_dim is fixed at 64, so heads = width / 64."
    )
    tiny_num_layers: int = Field(2, ge=1, le=64, description="Tiny model: LLM layers.")
    tiny_intermediate_size: int = Field(384, ge=64, description="Tiny model: LLM MLP width.")
    tiny_vision_hidden_size: int = Field(64, ge=32, description="Tiny model: vision encoder width (one head per 64).")
    tiny_vision_depth: int = Field(2, ge=1, le=64, description="Tiny model: vision encoder layers.")
    tiny_tie_word_embeddings: bool = Field(
        False, description="Tiny model: tie the output projection to the input embedding, as Qwen2.5-VL-3B does."
    )
    tiny_max_pixels: int = Field(
        224 * 224,
        ge=56 * 56,
        description="Tiny model's image processor budget in pixels (28 x 28 px per image token on Qwen2.5-VL, 32 x 32 on Qwen3-VL).",
    )
    tiny_shape: Literal["tiny", "qwen2_5_vl_3b", "qwen3_vl_4b"] = Field(
        "tiny",
        description="Built model (path None): tiny (the tiny_* widths) or a real model's widths with tiny_num_layers LLM layers and tiny_vision_depth vision blocks: qwen2_5_vl_3b (Qwen2.5-VL-3B: 151,936-row vocabulary, tied embeddings, Qwen2.5's tokenizer id layout) or qwen3_vl_4b (Qwen3-VL-4B, with model.tiny_family qwen3_vl: head_dim 128, DeepStack, Qwen3's 26 added tokens); their coordinate tokens come from coord_tokens, as for a real base checkpoint.",
    )
    tiny_family: Literal["qwen2_5_vl", "qwen3_vl"] = Field(
        "qwen2_5_vl",
        description="Built model (path None): its architecture (rlsys.models.families): qwen2_5_vl, or qwen3_vl (patch 16, 32 px per image token, DeepStack, interleaved M-RoPE). A checkpoint's family is read from its config.json.",
    )
    force_vocabulary_frame: bool = Field(
        False,
        description="Train or read a JSON vocabulary in a coordinate frame that is not the model family's own (qwen_json's resized pixels on Qwen3-VL, qwen3_json's 0..1000 grid on Qwen2.5-VL), refused otherwise: only for a checkpoint fine-tuned to that frame.",
    )
    min_pixels: MinPixels = None
    max_pixels: MaxPixels = None

    def pixel_budget(self) -> dict:
        return pixel_budget(self.min_pixels, self.max_pixels)

    @model_validator(mode="after")
    def _tiny_family_shape(self):
        # (the vocabulary's frame is checked against the checkpoint a run starts from, which may be
        # run.init_checkpoint: rlsys.data.prepare.prepare_model_dir)
        shape_family = {"qwen2_5_vl_3b": "qwen2_5_vl", "qwen3_vl_4b": "qwen3_vl"}.get(self.tiny_shape)
        if shape_family not in (None, self.tiny_family):
            raise ValueError(
                f"model.tiny_shape {self.tiny_shape} is a {shape_family} shape: set model.tiny_family {shape_family}"
            )
        return self

    @model_validator(mode="after")
    def _tiny_heads(self):
        self.pixel_budget()  # min <= max
        for name in ("tiny_hidden_size", "tiny_vision_hidden_size"):
            if getattr(self, name) % 64:
                raise ValueError(
                    f"model.{name} must be a multiple of 64 (head_dim 64: vLLM's CPU attention rejects smaller heads)"
                )
        return self

    def tiny_spec(self):

        shaped = {"qwen2_5_vl_3b": qwen2_5_vl_3b_shaped, "qwen3_vl_4b": qwen3_vl_4b_shaped}.get(self.tiny_shape)
        if shaped is not None:
            return shaped(
                num_layers=self.tiny_num_layers, vision_depth=self.tiny_vision_depth, max_pixels=self.tiny_max_pixels
            )

        return TinySpec(
            hidden_size=self.tiny_hidden_size,
            num_layers=self.tiny_num_layers,
            num_heads=self.tiny_hidden_size // 64,
            num_kv_heads=1,
            intermediate_size=self.tiny_intermediate_size,
            vision_hidden_size=self.tiny_vision_hidden_size,
            vision_depth=self.tiny_vision_depth,
            vision_heads=self.tiny_vision_hidden_size // 64,
            vision_intermediate_size=2 * self.tiny_vision_hidden_size,
            max_pixels=self.tiny_max_pixels,
            tie_word_embeddings=self.tiny_tie_word_embeddings,
            family=self.tiny_family,
        )


class DataConfig(_Section):
    train: str | None = Field(
        None,
        description="Training data: a .jsonl in rlsys.data.samples's schema or a COCO instances .json. None: the synthetic set under run.out_dir/data.",
    )
    val: str | None = Field(
        None,
        description="Held-out data for choosing settings (steps, reward, learning rate), same formats. None: the synthetic validation split.",
    )
    test: str | None = Field(
        None,
        description="Held-out data reported once, after the settings were chosen on val (python -m rlsys.demo's report), same formats. None: the synthetic test split.",
    )
    synthetic_train_images: int = Field(
        2000, ge=1, description="Images in the synthetic training split (when train is None)."
    )
    synthetic_val_images: int = Field(200, ge=1, description="Images in the synthetic validation split.")
    synthetic_test_images: int = Field(
        200, ge=1, description="Images in the synthetic test split (its own random stream: no image of val or train)."
    )
    synthetic_image_size_px: int = Field(
        224, ge=56, le=2048, description="Side of the synthetic square images, in pixels."
    )
    synthetic_max_objects: int = Field(6, ge=1, le=30, description="Most shapes in one synthetic scene.")
    synthetic_one_kind_per_scene: bool = Field(
        False,
        description="All shapes in a synthetic scene are of one kind (colours vary), so a detection answer lists every object: counting and enumeration without telling kinds apart.",
    )
    synthetic_position_ramp_levels: int = Field(
        0,
        ge=0,
        le=200,
        description="Paint each pixel's position into its colour (red ramps left-right, green top-bottom, by this many levels) so a model trained from random weights can localise; see rlsys.data.synthetic.paint_position_ramp. 0: off.",
    )
    synthetic_mask_fraction: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="Share of synthetic detection and referring samples that ask for their objects' masks instead of boxes (output mask: each mask written as a set of grid points, GETok section 3.2.1; needs model.vocabulary getok, and a reward that decodes masks: reward.sam_checkpoint, or reward.scorer=rewards.scorer:score_cell_masks on CPUs). 0: none.",
    )
    keypoint_style: Literal[KEYPOINT_STYLES] = Field(
        "paper",
        description='How SFT targets write keypoint answers: paper, the paper\'s form ({"person1": {"box": <x0><y0><x1><y1>, "keypoints": {...}}}), or rex_release, the released Rex-Omni model\'s (a ```json block, "bbox": " <x0> <y0> <x1> <y1> ", keypoints " <x> <y> " or "unvisible"; model.vocabulary rex_bins only). Answers in either form are read.',
    )
    tasks: list[str] | None = Field(None, description="Keep only samples of these tasks (None: all).")
    on_bad_record: Literal["refuse", "skip"] = Field(
        "refuse",
        description="A record that cannot be used (not UTF-8, not JSON, a bad field, a missing or unreadable image, a width/height that disagree with its image): refuse names it (file:line, id, why) and stops before Ray starts; skip leaves it out, counts it and prints the first few with their reasons at start.",
    )
    max_bad_images: int = Field(
        5,
        ge=0,
        description="Images that passed the check at start but fail to decode in a rollout worker are reported with their sample and left out of the step; past this many the run stops with the list.",
    )
    too_long: Literal["refuse", "skip"] = Field(
        "refuse",
        description="A sample whose prompt (image tokens under the pixel budget included) plus rollout.max_new_tokens cannot fit rollout.max_model_len_tokens: refuse the data at load, naming the sample and the numbers, or skip such samples and count them.",
    )
    seed: int = Field(0, description="Seed of the synthetic generator and of the prompt order.")


class RolloutConfig(_Section):
    num_engines: int = Field(1, ge=1, le=1024, description="vLLM engines in the rollout group (one Ray actor each).")
    gpus_per_engine: float = Field(0.0, ge=0, description="GPUs each engine actor requests (0 on CPU machines).")
    cpus_per_engine: float = Field(1.0, gt=0, description="CPUs each engine actor requests from Ray.")
    samples_per_prompt: int = Field(
        8, ge=2, le=256, description="G, answers sampled per prompt (the GRPO group). The paper uses 8."
    )
    temperature: float = Field(1.0, gt=0, le=2.0, description="Sampling temperature.")
    top_p: float = Field(1.0, gt=0, le=1.0, description="Nucleus sampling mass.")
    # in the engines' processed log-probs, so the behaviour ratio sees the distribution sampled from
    repetition_penalty: RepetitionPenalty = 1.0
    max_new_tokens: int = Field(128, ge=1, le=32768, description="Answer length limit, in tokens.")
    max_model_len_tokens: int = Field(
        1024, ge=64, description="vLLM context length (prompt with image tokens + answer)."
    )
    gpu_memory_utilization: float = Field(
        0.1,
        gt=0,
        le=0.95,
        description="vLLM's share of device memory (weights, activations, KV cache); on the CPU backend, of the RAM of the engine's NUMA node. Ignored for the KV cache when kv_cache_mib is set.",
    )
    kv_cache_mib: KvCacheMiB = None
    enforce_eager: bool = Field(
        True, description="Disable CUDA graphs / torch.compile in vLLM (faster start, required on CPU)."
    )
    timeout_s: float = Field(
        600.0, gt=0, description="Limit for one generate call; past it the engine is restarted and the step retried."
    )
    resources_per_engine: dict[str, float] = Field(
        default_factory=dict,
        description="Custom Ray node resources each engine bundle asks for, e.g. {rollout_node: 1} to keep engines on the nodes that advertise it.",
    )
    weight_transfer: Literal["auto", "nccl", "rlsys_gloo", "object_store"] = Field(
        "auto",
        description="How the learner's weights reach the engines: vLLM's weight-transfer protocol with its NCCL backend (GPUs) or rlsys's gloo backend (CPUs); object_store is the fallback (safetensors through Ray's object store). auto: nccl when engines and learner use GPUs, else rlsys_gloo.",
    )
    weight_bucket_mib: int = Field(
        256, ge=1, le=65536, description="Size of one packed weight-transfer bucket, in MiB."
    )


class RewardConfig(_Section):
    num_workers: int = Field(2, ge=1, le=4096, description="Reward worker actors (CPU).")
    cpus_per_worker: float = Field(0.5, gt=0, description="CPUs each reward worker requests from Ray.")
    matching: Literal["paper", "hungarian"] = Field(
        "paper", description="Box reward matching: the paper's equations 3-4, or one-to-one (stricter on duplicates)."
    )
    sample_timeout_s: float = Field(
        30.0,
        gt=0,
        description="Limit for scoring one answer; on timeout or error it is retried once, then scores 0 and is counted.",
    )
    sam_checkpoint: str | None = Field(
        None,
        description="Local SAM checkpoint for point-in-mask rewards on data without masks, and to decode GETok's mask answers (sets of points) into masks for the mask IoU reward and metric (the default scorer's decoder; rewards.scorer:score_cell_masks needs none).",
    )
    points_without_masks: Literal["refuse", "box"] = Field(
        "refuse",
        description="Pointing samples (point output, task other than gui) that have no masks while sam_checkpoint is unset: refuse them at start (their reward would be point-in-box, not the point-in-mask the run names), or score them point-in-box, counted per step as reward/kind/point_in_box_fallback.",
    )
    resources_per_worker: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray node resources each reward worker bundle asks for."
    )
    scorer: str = Field(
        "rewards.scorer:score",
        description="module:function scoring (text, Sample, mask_source=, matching=) -> RewardResult; replace it to train on your own reward.",
    )


class LoraSection(_Section):
    rank: int = Field(16, ge=1, le=1024, description="LoRA rank r of each adapter.")
    alpha: float = Field(32.0, gt=0, description="LoRA alpha: the update is scaled by alpha / rank.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapters' input while training.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        min_length=1,
        description="Names of the language model's linear layers that get adapters.",
    )
    vision: bool = Field(
        False, description="Also put adapters on the vision tower's and merger's linear layers (else they stay frozen)."
    )
    coordinate_rows: bool = Field(
        False,
        description="Also train the input-embedding and output-head rows of the vocabulary's own tokens (Rex-Omni's <0>..<999>, GETok's grid, ChatRex's indices; peft's trainable tokens: only those rows, not the matrices). Needed with model.coord_tokens=add, whose new rows start at the mean embedding and cannot be learned otherwise. A sync then sends the embedding and head too.",
    )


class LearnerConfig(_Section):
    num_ranks: int = Field(1, ge=1, le=4096, description="DeepSpeed data-parallel ranks (one Ray actor each).")
    gpus_per_rank: float = Field(0.0, ge=0, description="GPUs each learner rank requests (0: CPU with gloo).")
    cpus_per_rank: float = Field(1.0, gt=0, description="CPUs each learner rank requests from Ray.")
    zero_stage: ZeroStage = Field(2, description="DeepSpeed ZeRO stage, 0-2 (3 is refused: see _zero_stage_supported).")
    lr: float = Field(1e-5, gt=0, le=1.0, description="AdamW learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    grad_clip: float = Field(1.0, gt=0, description="Gradient norm clip.")
    micro_batch_size: int = Field(8, ge=1, description="Sequences per forward/backward on one rank.")
    clip_low: float = Field(0.2, ge=0, lt=1, description="PPO ratio clip below 1 (epsilon_low).")
    clip_high: float = Field(0.2, ge=0, description="PPO ratio clip above 1 (epsilon_high; DAPO raises it).")
    kl_coef: float = Field(0.01, ge=0, description="Weight of the k3 KL penalty to the reference policy (paper: 0.01).")
    warmup_steps: int = Field(
        0,
        ge=0,
        description="Linear learning-rate warm-up over the first N GRPO updates (lr x k/N at update k), then constant.",
    )
    advantage_scaling: Literal["group_std", "none"] = Field(
        "group_std",
        description="group_std: advantages (r - group mean) / group std (GRPO); none: r - group mean (Dr. GRPO), which does not blow a near-constant group's reward noise up to +-1.",
    )
    freeze_vision: bool = Field(
        False, description="Keep the vision encoder fixed during GRPO; the projector and the LLM still learn."
    )
    max_tokens_per_micro_batch: int | None = Field(
        None,
        ge=64,
        description="Pack a rank's micro-batches by tokens instead of micro_batch_size answers: whole prompt groups while the tokens through the LLM (a shared prompt counted once) stay within this; a group above it is split into pieces that each repeat the prompt; a prompt plus one answer above it is refused with the numbers. None: micro_batch_size answers per micro-batch.",
    )
    shared_prefix: bool = Field(
        True,
        description="One sequence per prompt group in the learner's training and reference passes: the prompt (with its image) once, then its answers, each attending to the prompt and itself only (rlsys.grpo.sequences.build_shared_batch); the same log-probs and gradients as one sequence per answer, with the vision tower and the prompt run once per group. A group's answers go to one rank (ranks balanced by tokens). false: one sequence per answer, answers dealt to ranks in turn.",
    )
    lora: LoraSection | None = Field(
        None,
        description="Train LoRA adapters instead of every parameter (peft): the reference policy is the model with its adapters off (no second copy), a sync sends the adapted layers' merged weights, checkpoints keep the adapters and their optimizer state and export a merged Hugging Face model. None: full training. Example: learner.lora.rank=16.",
    )
    shared_prefix_attention: Literal["auto", "dense_mask", "flex"] = Field(
        "auto",
        description="How a shared-prefix row's answers are kept apart (rlsys.grpo.attention): dense_mask: SDPA with an explicit L x L mask per row (runs anywhere; memory and work over the whole square); flex: torch FlexAttention with a block mask of the same rule, skipping the blocks where one answer would meet another (GPUs only: torch has no CPU backward for it); auto: flex when the learner has GPUs, dense_mask otherwise.",
    )
    off_policy_correction: Literal["stale", "always", "off"] = Field(
        "stale",
        description="Importance-weight the loss by the engines' log-probs (the behaviour policy; rlsys.grpo.algorithm.policy_loss): stale: answers made by older weights than the learner's (run.max_staleness_steps, sync_every_steps > 1); always: every answer, also correcting engine/learner numeric differences (bf16 engines); off: never.",
    )
    is_cap: float = Field(2.0, ge=1.0, description="Truncation of the off-policy importance weights, min(w, is_cap).")
    gradient_checkpointing: bool = Field(
        False,
        description="Recompute each decoder layer's activations in backward instead of keeping them (less memory for long VLM sequences, about one more forward of time).",
    )
    ref_colocated: bool = Field(
        True,
        description="Keep the frozen reference policy inside each learner rank. Only true is implemented (a separate reference actor group is not); false is refused.",
    )
    timeout_s: float = Field(1800.0, gt=0, description="Limit for one learner call (update, save).")
    resources_per_rank: dict[str, float] = Field(
        default_factory=dict,
        description="Custom Ray node resources each learner bundle asks for, e.g. {learner_node: 1}.",
    )

    @model_validator(mode="after")
    def _flex_needs_gpus(self):
        if self.shared_prefix_attention == "flex" and self.gpus_per_rank <= 0:
            raise ValueError(
                "learner.shared_prefix_attention flex needs learner.gpus_per_rank > 0 (torch's FlexAttention has "
                "no CPU backward); use auto or dense_mask on CPUs"
            )
        return self

    @model_validator(mode="after")
    def _reference_in_rank(self):
        if not self.ref_colocated:
            raise ValueError(
                "ref_colocated false is not implemented: the reference policy runs inside each learner "
                "rank (a separate reference actor group does not exist yet); set it true or kl_coef 0"
            )
        return self


class TrackingConfig(_Section):
    mode: Literal["online", "offline", "disabled", "auto"] = Field(
        "auto", description="W&B mode; auto is online with WANDB_API_KEY set, offline otherwise."
    )
    project: str = Field("rlsys", description="W&B project.")
    run_name: str | None = Field(None, description="W&B run name (default: derived from out_dir).")
    image_table_every_steps: int = Field(
        5, ge=0, description="Log a table of images with drawn predictions every N steps (0: never)."
    )


class RunConfig(_Section):
    out_dir: str = Field(
        "runs/grpo-tiny",
        description="Where checkpoints, the tiny model, synthetic data and W&B files go (relative to the working directory).",
    )
    steps: int = Field(20, ge=1, description="GRPO steps to run.")
    prompts_per_step: int = Field(
        8, ge=1, description="Prompts drawn per step; samples per step = prompts_per_step x samples_per_prompt."
    )
    dynamic_sampling: bool = Field(
        False, description="Drop groups whose reward std is 0 and draw more prompts to refill the step."
    )
    max_resample_rounds: int = Field(3, ge=0, description="Extra prompt draws per step when dynamic sampling refills.")
    sync_every_steps: int = Field(1, ge=1, description="Push the learner's weights to the generators every N updates.")
    max_staleness_steps: int = Field(
        0,
        ge=0,
        le=16,
        description="Asynchronous rollouts: generation of the next batches runs while the learner trains on this one, and no answer is learnt from more than N policy versions after the weights that made it (0: the synchronous loop). Stale answers are importance-weighted (learner.off_policy_correction).",
    )
    checkpoint_every_steps: int = Field(10, ge=1, description="Write a checkpoint every N steps (and at the end).")
    keep_checkpoints: int = Field(
        0,
        ge=0,
        description="Keep the newest N step checkpoints and the final one, deleting older ones after each save (a 3B checkpoint with optimizer state is ~60 GB). 0: keep all.",
    )
    resume: bool = Field(True, description="Continue from the last checkpoint in out_dir when there is one.")
    init_checkpoint: str | None = Field(
        None, description="Start the policy from this HF directory (an SFT result) instead of model.path."
    )
    seed: int = Field(0, description="Seed for prompt order, sampling and initialisation.")
    progress_label: str = Field(
        "",
        description="Put in front of every progress line, e.g. '[demo 3/6 grpo seed 0]' (the demo sets it per stage).",
    )
    actor_start_timeout_s: float = Field(
        900.0,
        gt=0,
        description="Limit for placing and starting the actor groups (a cold autoscaled GPU node can take long).",
    )
    max_restarts: int = Field(
        3,
        ge=0,
        description="Times a run rebuilds its actor groups and goes on from its last checkpoint after losing a learner rank, an engine that could not be restarted in place, a reward worker or a node (waiting up to actor_start_timeout_s for the cluster to offer the resources again); each restart is logged with its cause in restarts.jsonl. 0: the first loss ends the run.",
    )
    stop_timeout_s: float = Field(
        300.0,
        gt=0,
        description="After SIGTERM (ray job stop, a spot preemption notice) the run finishes its step and writes a checkpoint; past this many seconds, or on a second SIGTERM, it exits at once. Under ray job stop set RAY_JOB_STOP_WAIT_TIME_S above it in the job's env (Ray's default kills after 3 s).",
    )


def _coordinate_rows_need_tokens(model: ModelConfig, lora: LoraSection | None, where: str) -> None:
    """``lora.coordinate_rows`` trains the rows of the vocabulary's own tokens: refused for a
    vocabulary without any (the JSON ones write digits) before anything loads."""
    if lora is not None and lora.coordinate_rows and not model_tokens(model):
        raise ValueError(
            f"{where}.lora.coordinate_rows trains the rows of the vocabulary's own tokens, and model.vocabulary "
            f"{model.vocabulary} has none here (qwen_json and qwen3_json write digits; getok needs model.getok_grid set)"
        )


def _masks_need_a_mask_vocabulary(model: ModelConfig, data: DataConfig) -> None:
    """Synthetic mask samples asked of a vocabulary that cannot write masks: refused here, in
    the config, before any data is made (a loaded dataset is checked by rlsys.data.prepare.check_targets)."""

    if data.synthetic_mask_fraction > 0 and model.vocabulary not in MASK_VOCABULARIES:
        raise ValueError(
            f"data.synthetic_mask_fraction {data.synthetic_mask_fraction} asks for masks, which "
            f"model.vocabulary {model.vocabulary} cannot write (only {', '.join(MASK_VOCABULARIES)} does, "
            "as sets of grid points): set model.vocabulary=getok or data.synthetic_mask_fraction=0"
        )


class GRPOConfig(_Section):
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    rollout: RolloutConfig = RolloutConfig()
    reward: RewardConfig = RewardConfig()
    learner: LearnerConfig = LearnerConfig()
    tracking: TrackingConfig = TrackingConfig()
    run: RunConfig = RunConfig()

    @model_validator(mode="after")
    def _consistent(self):
        if self.learner.micro_batch_size > self.samples_per_step:
            raise ValueError(
                f"learner.micro_batch_size ({self.learner.micro_batch_size}) exceeds the samples per step "
                f"({self.samples_per_step} = run.prompts_per_step x rollout.samples_per_prompt)"
            )
        if self.run.sync_every_steps - 1 > self.run.max_staleness_steps:
            raise ValueError(
                f"run.sync_every_steps {self.run.sync_every_steps} trains on answers up to "
                f"{self.run.sync_every_steps - 1} versions old, past run.max_staleness_steps "
                f"{self.run.max_staleness_steps}: set run.max_staleness_steps >= {self.run.sync_every_steps - 1}"
            )
        if self.rollout.weight_transfer == "nccl" and not (
            self.rollout.gpus_per_engine > 0 and self.learner.gpus_per_rank > 0
        ):
            raise ValueError(
                "rollout.weight_transfer nccl needs GPUs on both sides (rollout.gpus_per_engine and "
                "learner.gpus_per_rank > 0); on CPUs use rlsys_gloo or auto"
            )
        _masks_need_a_mask_vocabulary(self.model, self.data)
        _coordinate_rows_need_tokens(self.model, self.learner.lora, "learner")
        return self

    @property
    def weight_transfer_backend(self) -> str:
        """``rollout.weight_transfer`` with auto resolved."""
        wt = self.rollout.weight_transfer
        if wt != "auto":
            return wt
        return "nccl" if self.rollout.gpus_per_engine > 0 and self.learner.gpus_per_rank > 0 else "rlsys_gloo"

    def cpus_requested(self) -> float:
        """Logical CPUs the actor groups ask Ray for (a cluster smaller than this waits forever
        without an autoscaler; the controller checks before starting them)."""
        return (
            self.rollout.num_engines * self.rollout.cpus_per_engine
            + self.learner.num_ranks * self.learner.cpus_per_rank
            + self.reward.num_workers * self.reward.cpus_per_worker
        )

    @property
    def samples_per_step(self) -> int:
        return self.run.prompts_per_step * self.rollout.samples_per_prompt

    def totals(self) -> dict:
        per_rank = -(-self.samples_per_step // self.learner.num_ranks)
        return {
            "samples_per_step": self.samples_per_step,
            "samples_per_rank_per_step": per_rank,
            "micro_batches_per_rank_per_step": -(-per_rank // self.learner.micro_batch_size),
            "total_samples": self.samples_per_step * self.run.steps,
            "weight_syncs": self.run.steps // self.run.sync_every_steps,
            "cpus_requested": self.cpus_requested(),
        }


class ConfigError(ValueError):
    """A config file or override that does not fit the schema; names the file and field."""


def _set_dotted(d: dict, key: str, value) -> None:
    parts = key.split(".")
    cur = d
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
        if not isinstance(cur, dict):
            raise ConfigError(f"override {key}: {p} is not a section")
    cur[parts[-1]] = value


def load_config(path=None, overrides=(), schema=GRPOConfig):
    """Read YAML values (default: the tiny CPU config), apply ``key=value`` overrides, validate."""
    path = Path(path) if path is not None else DEFAULT_CONFIG
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"override {ov!r}: expected key=value, e.g. run.steps=3")
        key, _, val = ov.partition("=")
        _set_dotted(raw, key.strip(), yaml.safe_load(val))
    try:
        return schema.model_validate(raw)
    except ValidationError as exc:
        lines = [f"{path}: invalid config"]
        for e in exc.errors():
            loc = ".".join(str(x) for x in e["loc"]) or "(top level)"
            lines.append(f"  {loc}: {e['msg']} (got {e.get('input')!r})")
        raise ConfigError("\n".join(lines)) from None


def describe(schema=GRPOConfig, prefix: str = "") -> list[str]:
    """One line per field with its default and docstring (for --help-config)."""
    out = []
    for name, f in schema.model_fields.items():
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out += describe(ann, f"{prefix}{name}.")
        else:
            out.append(f"{prefix}{name} = {f.default!r}: {f.description}")
    return out


# ----------------------------------------------------------------------------------------------
# SFT (python -m rlsys.sft): a Ray Train job ahead of GRPO
# ----------------------------------------------------------------------------------------------
class SFTTrainConfig(_Section):
    num_workers: int = Field(1, ge=1, le=4096, description="Ray Train workers (data-parallel DeepSpeed ranks).")
    use_gpu: bool = Field(False, description="One GPU per worker (NCCL) instead of CPU (gloo).")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs each Ray Train worker requests.")
    steps: int = Field(200, ge=1, description="Optimizer steps.")
    micro_batch_size: int = Field(8, ge=1, description="Conversations per forward/backward on one worker.")
    grad_accum_steps: int = Field(
        1,
        ge=1,
        description="Micro-batches per optimizer step; global batch = micro_batch_size x grad_accum_steps x num_workers.",
    )
    lr_vision: float = Field(2e-6, ge=0, description="Learning rate of the vision encoder (paper: 2e-6).")
    lr_projector: float = Field(2e-5, ge=0, description="Learning rate of the vision-language merger (paper: 2e-5).")
    lr_llm: float = Field(2e-5, ge=0, description="Learning rate of the language model (paper: 2e-5).")
    warmup_fraction: float = Field(
        0.03, ge=0, lt=1, description="Linear warm-up share of the steps (paper: 3%), then cosine decay."
    )
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay (paper: 0.01).")
    grad_clip: float = Field(1.0, gt=0, description="Gradient norm clip.")
    zero_stage: ZeroStage = Field(2, description="DeepSpeed ZeRO stage, 0-2 (3 is refused: see _zero_stage_supported).")
    max_phrases: int = Field(4, ge=1, description="Most phrases sampled into one multi-phrase question.")
    coord_label_sigma_bins: float = Field(
        0.0,
        ge=0,
        le=100,
        description="Soft targets for coordinate tokens: a Gaussian of this width in bins over <0>..<999> instead of a one-hot (SimCC-style). 0: plain cross-entropy, as the paper.",
    )
    lora: LoraSection | None = Field(
        None,
        description="Train LoRA adapters instead of every parameter (peft), each adapter at its part's learning rate; the final model is exported with them merged. None: full fine-tuning. Example: train.lora.rank=16.",
    )
    checkpoint_every_steps: int = Field(100, ge=1, description="Ray Train checkpoint every N steps (resumable).")
    log_every_steps: int = Field(10, ge=1, description="Progress line and W&B log every N steps.")
    seed: int = Field(0, description="Seed for conversation sampling and initialisation.")


class SFTRunConfig(_Section):
    out_dir: str = Field(
        "runs/sft-tiny", description="Ray Train storage, the final model (out_dir/final) and W&B files."
    )
    resume: bool = Field(True, description="Continue from the latest Ray Train checkpoint in out_dir.")
    progress_label: str = Field(
        "", description="Put in front of every progress line, e.g. '[demo 2/6 sft-multi]' (the demo sets it per stage)."
    )
    stop_timeout_s: float = Field(
        300.0,
        gt=0,
        description="After SIGTERM (ray job stop, a spot preemption notice) the workers finish their step and write a checkpoint, and the run exits 143 (the same command resumes it); past this many seconds, or on a second SIGTERM, it exits at once. Under ray job stop set RAY_JOB_STOP_WAIT_TIME_S above it in the job's env.",
    )


class SFTConfig(_Section):
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: SFTTrainConfig = SFTTrainConfig()
    tracking: TrackingConfig = TrackingConfig()
    run: SFTRunConfig = SFTRunConfig()

    @model_validator(mode="after")
    def _soft_targets_need_bins(self):
        if self.train.coord_label_sigma_bins > 0 and self.model.vocabulary != "rex_bins":
            raise ValueError(
                f"train.coord_label_sigma_bins spreads targets over neighbouring coordinate bins; "
                f"model.vocabulary {self.model.vocabulary} writes no bins (set it to 0)"
            )
        _masks_need_a_mask_vocabulary(self.model, self.data)
        _coordinate_rows_need_tokens(self.model, self.train.lora, "train")
        if self.data.keypoint_style == "rex_release" and self.model.vocabulary != "rex_bins":
            raise ValueError(
                "data.keypoint_style rex_release writes the release's quoted coordinate bins; "
                f"model.vocabulary {self.model.vocabulary} writes no bins (use keypoint_style paper)"
            )
        return self

    def totals(self) -> dict:
        g = self.train.micro_batch_size * self.train.grad_accum_steps * self.train.num_workers
        return {
            "global_batch": g,
            "conversations_seen": g * self.train.steps,
            "warmup_steps": int(self.train.warmup_fraction * self.train.steps),
        }


# ---------------------------------------------------------------------------------------------
# Serving (python -m rlsys.serve; values in configs/serve_*.yaml)
# ---------------------------------------------------------------------------------------------
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
    prompt_set: PromptSetName = Field("paper", description=PROMPT_SET_HELP)
    vocabulary: VocabularyName = Field(
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
    repetition_penalty: RepetitionPenalty = 1.0


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
