"""One pixel budget per config: image tokens under it, and samples that cannot fit the engines'
context refused at load (or skipped and counted), never sent to an engine."""

import pytest

from rlsys.config import ConfigError, load_config
from rlsys.data.prepare import check_fit, image_tokens
from rlsys.data.samples import load_jsonl
from rlsys.models import load_processor


def test_image_tokens_follow_the_budget(tiny_model_dir):
    proc = load_processor(tiny_model_dir)  # the tiny checkpoint's own budget: 224 x 224
    assert image_tokens(proc, 224, 224) == (64, 224, 224)
    small = load_processor(tiny_model_dir, pixels={"max_pixels": 112 * 112})
    assert image_tokens(small, 224, 224) == (16, 112, 112)
    # a large image is brought under the budget (aspect kept, multiples of 28 px)
    n, w, h = image_tokens(small, 4000, 2000)
    assert w * h <= 112 * 112 and w % 28 == 0 and h % 28 == 0 and n == (w // 28) * (h // 28) and w > h
    # the processor produces what image_tokens predicts
    from PIL import Image

    grid = small.image_processor(images=[Image.new("RGB", (4000, 2000))], return_tensors="pt")["image_grid_thw"][0]
    assert int(grid.prod()) // 4 == n


def test_samples_that_cannot_fit_the_context_are_refused_or_skipped(tiny_model_dir, synthetic_dir):
    proc = load_processor(tiny_model_dir)
    samples = load_jsonl(synthetic_dir / "train.jsonl")
    kept, skipped = check_fit(samples, proc, max_model_len=1024, max_new_tokens=128)
    assert kept == samples and skipped == 0
    # 64 image tokens + the chat markup + the question + 128 answer tokens cannot fit 200
    with pytest.raises(
        ConfigError,
        match=r"train.jsonl:\d+ sample '.+': prompt \d+ tokens \+ 64 image tokens "
        r"\(224x224 px resized to 224x224\) \+ rollout.max_new_tokens 128 = \d+ > "
        r"rollout.max_model_len_tokens 200.*data.too_long=skip",
    ):
        check_fit(samples, proc, max_model_len=200, max_new_tokens=128)
    kept, skipped = check_fit(samples, proc, max_model_len=200, max_new_tokens=128, too_long="skip")
    assert kept == [] and skipped == len(samples)
    # the bound is safe and tight: against the real prompt of every template (processor with the
    # image), the computed need is never below it and at most a few tokens above
    from PIL import Image

    from rlsys.lang.prompts import build_question, chat_prompt, templates_for

    class Pick:
        def __init__(self, k):
            self.k = k

        def randrange(self, n):
            return self.k

    for s in [s for s in samples if s.task != "keypoint"][:6]:
        real = (
            max(
                len(
                    proc(
                        text=[
                            chat_prompt(
                                proc,
                                build_question(
                                    s.task,
                                    s.output,
                                    s.phrases,
                                    width=s.width,
                                    height=s.height,
                                    prompt_boxes=s.prompt_boxes,
                                    rng=Pick(k),
                                ),
                            )
                        ],
                        images=[Image.open(s.image)],
                        return_tensors="pt",
                    )["input_ids"][0]
                )
                for k in range(len(templates_for(s.task, s.output)))
            )
            + 128
        )
        need = next(n for n in range(real - 5, real + 50) if check_fit([s], proc, n, 128, "skip")[0])
        assert real <= need <= real + 3, (s.id, real, need)
        assert check_fit([s], proc, need - 1, 128, "skip")[1] == 1


def test_the_budget_is_one_config_value():
    cfg = load_config(overrides=["model.min_pixels=3136", "model.max_pixels=50176"])
    assert cfg.model.pixel_budget() == {"min_pixels": 3136, "max_pixels": 50176}
    assert load_config().model.pixel_budget() == {}  # the checkpoint's own
    with pytest.raises(ConfigError, match="min_pixels .* exceeds max_pixels"):
        load_config(overrides=["model.min_pixels=50176", "model.max_pixels=3136"])
    from rlsys.serve.app import load_serve_config

    assert load_serve_config(None, ["model.max_pixels=2007040"]).model.pixel_budget() == {"max_pixels": 2007040}
