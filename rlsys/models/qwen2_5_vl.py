"""Qwen2.5-VL: patch 14 merged 2 x 2 (28 px per image token), window attention in the ViT with a
few full-attention blocks, 3-D M-RoPE in sections, one merger into the LLM; grounding JSON in
pixels of the processor-resized image (``qwen_json``)."""

from __future__ import annotations

from rlsys.models.family import Family, tiny_special_token_ids, tiny_text_config


def tiny_config(spec, ids: dict[str, int], vocab_rows: int):
    from transformers import Qwen2_5_VLConfig

    head_dim = spec.attention_head_dim
    # M-RoPE splits head_dim/2 rotary frequencies over (time, height, width); Qwen2.5-VL uses
    # [16, 24, 24] for head_dim 128, scaled here to the tiny head.
    mrope = [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16]
    return Qwen2_5_VLConfig(
        text_config=tiny_text_config(spec, ids, vocab_rows, {"mrope_section": mrope}),
        vision_config=dict(
            depth=spec.vision_depth,
            hidden_size=spec.vision_hidden_size,
            intermediate_size=spec.vision_intermediate_size,
            num_heads=spec.vision_heads,
            out_hidden_size=spec.hidden_size,
            window_size=112,
            fullatt_block_indexes=[spec.vision_depth - 1],
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            tokens_per_second=2,
        ),
        **tiny_special_token_ids(ids),
        tie_word_embeddings=spec.tie_word_embeddings,
    )


def tiny_processor(spec, tokenizer, chat_template: str):
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    size = {"shortest_edge": spec.min_pixels, "longest_edge": spec.max_pixels}
    return Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(size=size),
        video_processor=Qwen2VLVideoProcessor(size=size),
        tokenizer=tokenizer,
        chat_template=chat_template,
    )


FAMILY = Family(
    model_type="qwen2_5_vl",
    title="Qwen2.5-VL",
    pixels_per_token=28,
    json_vocabulary="qwen_json",
    tiny_config=tiny_config,
    tiny_processor=tiny_processor,
    reuses_frozen_tower=True,
)
