"""``rewards.sam.SamMaskSource`` on a tiny random SAM saved to disk: the real load and
prompt/post-process path, with shapes, caching and errors checked (random weights make the
mask content arbitrary, so content is never asserted)."""

from __future__ import annotations

import numpy as np
import pytest

from rlsys.data.samples import Instance, Sample

W, H = 48, 40  # not square, not SAM's input size: post-processing must undo resize and pad

# A ~50k-parameter SAM. Constraints read from transformers' SAM code: the prompt encoder,
# mask decoder and vision output_channels share one hidden size (32), divisible by 8 for the
# decoder's upscaling; the shared positional embedding has 2 * num_pos_feats = 32 channels;
# image_size / patch_size = 4x4 image embedding, windowed attention of 2 with one global layer.
IMAGE_SIZE = 64
VISION = dict(
    hidden_size=16,
    output_channels=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    image_size=IMAGE_SIZE,
    patch_size=16,
    window_size=2,
    global_attn_indexes=[1],
    num_pos_feats=16,
    mlp_dim=32,
)
PROMPT = dict(hidden_size=32, image_size=IMAGE_SIZE, patch_size=16, mask_input_channels=4)
DECODER = dict(
    hidden_size=32, mlp_dim=32, num_hidden_layers=1, num_attention_heads=2, iou_head_depth=2, iou_head_hidden_dim=16
)


@pytest.fixture(scope="module")
def sam_dir(tmp_path_factory):
    import torch
    from transformers import SamConfig, SamModel, SamProcessor
    from transformers.models.sam.image_processing_sam import SamImageProcessor

    torch.manual_seed(0)
    model = SamModel(SamConfig(vision_config=VISION, prompt_encoder_config=PROMPT, mask_decoder_config=DECODER))
    # The processor's resize/pad must match the model's image_size; low-res masks are 4x the
    # 4x4 embedding = 16 px.
    proc = SamProcessor(
        SamImageProcessor(
            size={"longest_edge": IMAGE_SIZE},
            pad_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
            mask_size={"longest_edge": 16},
            mask_pad_size={"height": 16, "width": 16},
        )
    )
    out = tmp_path_factory.mktemp("sam") / "tiny-sam"
    model.save_pretrained(out)
    proc.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    from PIL import Image

    rng = np.random.default_rng(0)
    p = tmp_path_factory.mktemp("img") / "img.png"
    Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(p)
    return str(p)


def pointing_sample(image, instances, sid="s1"):
    return Sample(sid, image, W, H, "pointing", ["cat", "dog"], instances, "point")


def test_masks_shapes_and_cache(sam_dir, image_path):
    from rewards.sam import SamMaskSource

    src = SamMaskSource(sam_dir, cache_size=8)
    smp = pointing_sample(
        image_path, [Instance("cat", box=(2.0, 3.0, 20.0, 30.0)), Instance("dog", box=(25.04, 5.0, 47.0, 39.0))]
    )
    masks = src(smp)
    assert len(masks) == 2
    for m in masks:
        assert isinstance(m, np.ndarray) and m.dtype == bool and m.shape == (H, W)
    # One image encoding and one batched decoder pass for both boxes.
    assert (src.forward_calls, src.decoder_calls, src.cache_hits, src.cache_misses) == (1, 1, 0, 2)

    # Another rollout of the same sample, and a box that rounds to the same 0.1 px: no SAM run.
    again = src(
        pointing_sample(
            image_path, [Instance("cat", box=(2.0, 3.0, 20.0, 30.0)), Instance("dog", box=(25.0, 5.0, 47.0, 39.0))]
        )
    )
    assert (src.forward_calls, src.decoder_calls, src.cache_hits) == (1, 1, 2)
    for a, b in zip(masks, again):
        np.testing.assert_array_equal(a, b)

    # Mixed: one cached box, a new box and a point-only instance -> one encoding, one decoder
    # pass per prompt kind, and the instance's own mask returned as is.
    own = np.zeros((H, W), dtype=bool)
    own[:5, :5] = True
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(own.astype(np.uint8)))
    rle = {"size": [H, W], "counts": rle["counts"].decode()}
    mixed = src(
        pointing_sample(
            image_path,
            [
                Instance("cat", box=(2.0, 3.0, 20.0, 30.0)),
                Instance("dog", box=(1.0, 1.0, 10.0, 10.0)),
                Instance("dog", point=(30.0, 20.0)),
                Instance("cat", box=(0.0, 0.0, 5.0, 5.0), mask=rle),
            ],
        )
    )
    assert [m.shape for m in mixed] == [(H, W)] * 4 and all(m.dtype == bool for m in mixed)
    np.testing.assert_array_equal(mixed[3], own)
    assert (src.forward_calls, src.decoder_calls, src.cache_hits, src.cache_misses) == (2, 3, 3, 4)


def test_multimask_and_lru_eviction(sam_dir, image_path):
    from rewards.sam import SamMaskSource

    src = SamMaskSource(sam_dir, cache_size=1, multimask=True)
    a = pointing_sample(image_path, [Instance("cat", box=(2.0, 3.0, 20.0, 30.0))])
    b = pointing_sample(image_path, [Instance("dog", point=(10.0, 10.0))])
    assert src(a)[0].shape == (H, W)
    assert src(b)[0].shape == (H, W)  # evicts a's mask (cache of 1)
    src(a)
    assert src.forward_calls == 3 and src.cache_hits == 0
    src(a)
    assert src.forward_calls == 3 and src.cache_hits == 1


def test_errors(sam_dir, image_path, tmp_path):
    from rewards.sam import SamMaskSource

    missing = tmp_path / "no-such-sam"
    with pytest.raises(FileNotFoundError, match="no-such-sam"):
        SamMaskSource(missing)
    not_sam = tmp_path / "not-sam"
    not_sam.mkdir()
    (not_sam / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ValueError, match="not-sam.*not a SAM checkpoint"):
        SamMaskSource(not_sam)

    src = SamMaskSource(sam_dir)
    bare = pointing_sample(image_path, [Instance("cat", box=(2.0, 3.0, 20.0, 30.0)), Instance("dog")], sid="bare")
    with pytest.raises(ValueError, match=r"'bare'.*instances\[1\]"):
        src(bare)


def test_scorer_uses_sam_masks(sam_dir, image_path):
    from rewards.sam import SamMaskSource
    from rewards.scorer import score

    src = SamMaskSource(sam_dir)
    smp = pointing_sample(
        image_path, [Instance("cat", box=(2.0, 3.0, 20.0, 30.0)), Instance("dog", box=(25.0, 5.0, 47.0, 39.0))]
    )
    text = (
        "<|object_ref_start|>cat<|object_ref_end|><|box_start|><200><400><|box_end|>, "
        "<|object_ref_start|>dog<|object_ref_end|><|box_start|><700><500><|box_end|>"
    )
    r = score(text, smp, mask_source=src)
    assert (r.kind, r.num_pred, r.num_gt, r.unreadable) == ("point_in_mask", 2, 2, 0)
    assert 0.0 <= r.reward <= 1.0
    assert score(text, smp).kind == "point_in_box_fallback"  # the same sample without a source


def test_point_sets_decode_through_sam(sam_dir, image_path):
    """GETok's mask answers: a set of points is one SAM prompt (all positive); sets are batched
    per size, cached as sets (order and repeats within 0.1 px do not matter), and a set with no
    usable point is an empty mask without running SAM."""
    from rewards.sam import SamMaskSource
    from rewards.scorer import score
    from rlsys.data.synthetic import _rle
    from rlsys.lang.vocab import GETok

    src = SamMaskSource(sam_dir, cache_size=8)
    own = np.zeros((H, W), dtype=bool)
    own[5:20, 5:30] = True
    smp = Sample("m", image_path, W, H, "detection", ["cat"], [Instance("cat", mask=_rle(own))], "mask")
    sets = [
        (10.0, 10.0),
        (10.0, 10.0, 30.0, 20.0),
        (30.0, 20.0, 10.0, 10.0, 10.02, 10.01),
        (float("nan"), 5.0, -3.0, 2.0),
        (),
    ]
    masks = src.masks_from_points(smp, sets)
    assert [m.shape for m in masks] == [(H, W)] * 5 and all(m.dtype == bool for m in masks)
    np.testing.assert_array_equal(masks[1], masks[2])
    assert not masks[3].any() and not masks[4].any()
    # one image encoding, one decoder pass per set size (1 and 2 points); the third set is the
    # second's, asked twice in one call, so it runs once
    assert (src.forward_calls, src.decoder_calls, src.cache_hits, src.cache_misses) == (1, 2, 0, 3)
    again = src.masks_from_points(smp, sets[:3])
    assert (src.forward_calls, src.cache_hits) == (1, 3)
    for a, b in zip(masks, again):
        np.testing.assert_array_equal(a, b)
    # the default scorer decodes a GETok mask answer through it
    text = "<|object_ref_start|>cat<|object_ref_end|><|box_start|><grid0_0><grid1_0>,<grid3_3><|box_end|>"
    r = score(text, smp, vocabulary=GETok(4), mask_source=src)
    assert r.kind == "mask_iou" and 0.0 <= r.reward <= 1.0 and (r.num_pred, r.num_gt) == (2, 1)
