"""Qwen3-VL (dense: 2B/4B/8B/32B): patch 16 merged 2 x 2 (32 px per image token), learned absolute
position embeddings interpolated to the image, DeepStack (features of several ViT blocks, each
through its own merger, added to the first LLM layers' hidden states), interleaved M-RoPE; the
smaller sizes tie ``lm_head`` to the embedding. Grounding JSON on a 0..1000 grid relative to the
image (``qwen3_json``)."""

from __future__ import annotations

from rlsys.models.family import Family, tiny_special_token_ids, tiny_text_config


def tiny_config(spec, ids: dict[str, int], vocab_rows: int):
    from transformers import Qwen3VLConfig

    head_dim = spec.attention_head_dim
    # Qwen3-VL interleaves its M-RoPE frequencies over (time, height, width) in sections
    # [24, 20, 20] of head_dim/2 = 64, scaled here to the tiny head
    mrope = [3 * head_dim // 16, 5 * head_dim // 32, head_dim // 2 - 3 * head_dim // 16 - 5 * head_dim // 32]
    # DeepStack on: the first blocks' features (Qwen3-VL-4B: blocks 5, 11, 17 of 24) feed the
    # first LLM layers, as many as there are of both
    deepstack = list(range(min(spec.vision_depth, spec.num_layers)))
    grid = int((spec.max_pixels**0.5) // 16) + 1  # learned positions of a square at the budget
    return Qwen3VLConfig(
        text_config=dict(
            tiny_text_config(spec, ids, vocab_rows, {"mrope_section": mrope, "mrope_interleaved": True}),
            head_dim=head_dim,  # Qwen3 sets it apart from hidden_size / heads (4B: 128 x 32 over 2560)
        ),
        vision_config=dict(
            depth=spec.vision_depth,
            hidden_size=spec.vision_hidden_size,
            intermediate_size=spec.vision_intermediate_size,
            num_heads=spec.vision_heads,
            out_hidden_size=spec.hidden_size,
            patch_size=16,
            spatial_merge_size=2,
            temporal_patch_size=2,
            num_position_embeddings=grid * grid,
            deepstack_visual_indexes=deepstack,
        ),
        **tiny_special_token_ids(ids),
        tie_word_embeddings=spec.tie_word_embeddings,
    )


def tiny_processor(spec, tokenizer, chat_template: str):
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    size = {"shortest_edge": spec.min_pixels, "longest_edge": spec.max_pixels}
    half = [0.5, 0.5, 0.5]  # Qwen3-VL normalises pixels to [-1, 1]
    return Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(size=size, patch_size=16, merge_size=2, image_mean=half, image_std=half),
        video_processor=Qwen3VLVideoProcessor(size=size, patch_size=16, merge_size=2, image_mean=half, image_std=half),
        tokenizer=tokenizer,
        chat_template=chat_template,
    )


FAMILY = Family(
    model_type="qwen3_vl",
    title="Qwen3-VL",
    pixels_per_token=32,
    json_vocabulary="qwen3_json",
    tiny_config=tiny_config,
    tiny_processor=tiny_processor,
    # the tower returns DeepStack features beside its output, each with its own merger, and
    # has no window order: freeze_vision runs the tower inside each pass instead
    reuses_frozen_tower=False,
    notes=(
        "a real checkpoint's tokenizer (151,643 BPE entries and 26 added tokens with <think>), "
        "3 DeepStack blocks over 24, video timestamps, bf16 numerics"
    ),
)
