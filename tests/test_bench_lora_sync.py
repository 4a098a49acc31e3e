"""rlsys.bench.lora_sync: both ways a LoRA learner's update can reach a vLLM engine work, give the
same model, and the bench reports their bytes, seconds and tokens/s (figures in docs/RESULTS.md)."""

import pytest

pytestmark = pytest.mark.slow


def test_merged_reload_and_adapter_hot_load_give_the_same_engine(tmp_path):
    from rlsys.bench.lora_sync import compare, table

    res = compare("demo_g8", tmp_path, rank=8, repeats=1, timeout_s=900)
    m, a, f = res["merged"], res["adapter"], res["full"]
    # each engine's greedy answers moved after its sync, and the two engines answer alike
    assert m["greedy_answers_changed"] > 0 and a["greedy_answers_changed"] > 0 and f["greedy_answers_changed"] > 0
    assert res["greedy_answers_agree"] >= m["prompts"] - 1, res
    # full training's sync loads the same merged update and the rest as it was: the same answers
    assert res["greedy_full_equals_merged"] == m["prompts"], res
    # and moves every weight, more than the adapted layers
    assert res["ratios"]["sync_bytes_full_over_merged"] > 1.2, res["ratios"]
    # adapters are smaller than the merged layers they make (rank 8 of the tiny model's widths)
    assert res["ratios"]["sync_bytes_merged_over_adapter"] > 2, res["ratios"]
    assert "| a sync's bytes (MiB) |" in table(res) and "| full / merged |" in table(res)
