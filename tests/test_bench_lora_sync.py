"""rlsys.bench.lora_sync: both ways a LoRA learner's update can reach a vLLM engine work, give the
same model, and the bench reports their bytes, seconds and tokens/s (figures in docs/RESULTS.md)."""

import pytest

pytestmark = pytest.mark.slow


def test_merged_reload_and_adapter_hot_load_give_the_same_engine(tmp_path):
    from rlsys.bench.lora_sync import compare, table

    res = compare("demo_g8", tmp_path, rank=8, repeats=1, timeout_s=900)
    m, a = res["merged"], res["adapter"]
    # each engine's greedy answers moved after its sync, and the two engines answer alike
    assert m["greedy_answers_changed"] > 0 and a["greedy_answers_changed"] > 0
    assert res["greedy_answers_agree"] >= m["prompts"] - 1, res
    # adapters are smaller than the merged layers they make (rank 8 of the tiny model's widths)
    assert res["ratios"]["sync_bytes_merged_over_adapter"] > 2, res["ratios"]
    assert "| a sync's bytes (MiB) |" in table(res)
