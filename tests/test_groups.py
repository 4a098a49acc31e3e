"""The actor groups' pure parts: sharding, micro-batch plans, weight packing and the digest
comparison. Hand-worked values; no Ray."""

import pytest
import torch

from actors.group import by_group, micro_batch_plan, round_robin
from actors.weight_sync import compare_digests, pack, params_checksum, plan_buckets, tensor_digest, unpack


def test_round_robin_deals_items_in_turn():
    # 9 items over 2 members: 0,2,4,6,8 and 1,3,5,7 (sizes 5 and 4)
    assert round_robin(9, 2) == [[0, 2, 4, 6, 8], [1, 3, 5, 7]]
    assert round_robin(1, 3) == [[0], [], []]


def test_by_group_keeps_each_group_on_one_member():
    # 3 groups of G = 2 over 2 members: groups 0 and 2 on member 0, group 1 on member 1
    assert by_group(3, 2, 2) == [[0, 1, 4, 5], [2, 3]]
    shards = by_group(7, 8, 3)
    for g in range(7):
        owners = {k for k, sh in enumerate(shards) if set(range(g * 8, g * 8 + 8)) & set(sh)}
        assert len(owners) == 1
    assert sorted(i for sh in shards for i in sh) == list(range(56))


def test_micro_batch_plan_takes_the_largest_shard():
    # shards of 5 and 4 with micro-batch 4: ceil(5/4) = 2 on both ranks (the second pads one)
    assert micro_batch_plan([5, 4], 4) == 2
    # a rank with nothing still runs one (zero-weight) micro-batch: every rank joins the reduce
    assert micro_batch_plan([1, 0], 8) == 1
    assert micro_batch_plan([16, 16], 8) == 2
    with pytest.raises(ValueError):
        micro_batch_plan([1], 0)


def test_buckets_cut_at_the_byte_limit_and_round_trip():
    meta = [
        ("a", torch.float32, (2, 3)),
        ("b", torch.bfloat16, (4,)),
        ("c", torch.float32, ()),
        ("d", torch.float32, (10,)),
    ]
    # bytes: a 24, b 8, c 4, d 40. Limit 32: [a, b] (32), [c] (4 + 40 > 32), [d] (alone, over the limit)
    assert plan_buckets(meta, 32) == [[0, 1], [2], [3]]
    assert plan_buckets(meta, 10**6) == [[0, 1, 2, 3]]
    ts = {
        "a": torch.arange(6.0).view(2, 3),
        "b": torch.tensor([1.0, -2.0, 3.5, 0.25], dtype=torch.bfloat16),
        "c": torch.tensor(7.0),
        "d": torch.linspace(-1, 1, 10),
    }
    got = {}
    for idx in plan_buckets(meta, 32):
        part = [meta[i] for i in idx]
        got.update(unpack(pack([ts[m[0]] for m in part]), part))
    for name, t in ts.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape and torch.equal(got[name], t)
    with pytest.raises(ValueError, match="bytes"):
        unpack(torch.zeros(5, dtype=torch.uint8), [("a", torch.float32, (2,))])


def test_tensor_digest_in_chunks_equals_the_whole_float64_sums():
    # the digest is taken in chunks (no float64 copy of a whole embedding); any chunk size gives
    # numel, sum and sum of squares equal to the one-shot float64 values, for bf16 and float32,
    # including a last partial chunk and a 0-d tensor
    g = torch.Generator().manual_seed(0)
    for t in (torch.randn(1001, 7, generator=g).to(torch.bfloat16), torch.randn(33, generator=g), torch.tensor(2.5)):
        x = t.to(torch.float64)
        want = (x.numel(), float(x.sum()), float((x * x).sum()))
        for chunk in (1, 5, 64, 10**6):
            n, s, sq = tensor_digest(t, chunk_elements=chunk)
            assert n == want[0]
            assert s == pytest.approx(want[1], rel=1e-12, abs=1e-9) and sq == pytest.approx(want[2], rel=1e-12)
    # hand-worked: [1, -2, 3] -> (3, 2, 14)
    assert tensor_digest(torch.tensor([1.0, -2.0, 3.0]), chunk_elements=2) == (3, 2.0, 14.0)


def test_digest_comparison_is_name_by_name_and_counts_a_tied_embedding_once():
    emb = torch.nn.Embedding(5, 3)
    head = torch.nn.Linear(3, 5, bias=False)
    head.weight = emb.weight  # tied, as Qwen2.5-VL-3B ties lm_head to embed_tokens
    model = torch.nn.ModuleDict({"embed": emb, "lm_head": head})
    sent = params_checksum(model.named_parameters())
    # named_parameters yields a shared tensor once: that is what the learner sends
    assert list(sent["per_name"]) == ["embed.weight"] and sent["numel"] == 15
    assert compare_digests(sent, params_checksum(list(model.named_parameters()))) == []
    # a state dict has both names: comparing it with what was sent would report the extra name
    both = params_checksum(model.state_dict().items())
    assert compare_digests(sent, both) == ["received but not sent: lm_head.weight"]
    changed = {"embed.weight": emb.weight.detach() + 1e-3}
    assert compare_digests(sent, params_checksum(changed.items()))[0].startswith("embed.weight: learner")
    assert compare_digests(sent, None) == ["the engine has received no weights through the protocol yet"]


def test_vllm_reload_warnings_for_buffer_only_layers_are_dropped_and_others_kept():
    """vLLM warns '<Layer>: Failed to load weights' on each push for layers that hold only computed
    buffers (rotary caches, image normalisation) or the tied output head; rlsys drops those on
    vLLM's own logger and lets any other layer's warning through."""
    import logging

    from vllm.model_executor.model_loader.reload import layerwise

    import actors.weight_sync  # noqa: F401  (installs the filter on import, as in vLLM's workers)

    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    h = Keep()
    layerwise.logger.addHandler(h)
    try:
        for name in ("MRotaryEmbedding", "ParallelLMHead", "FusedMMInputNorm", "QKVParallelLinear"):
            layerwise.logger.warning("%s: Failed to load weights", name)
        layerwise.logger.warning("Allocating %.1f MB", 3.0)
    finally:
        layerwise.logger.removeHandler(h)
    assert seen == ["QKVParallelLinear: Failed to load weights", "Allocating 3.0 MB"]


def test_balance_groups_keeps_groups_whole_and_balances_tokens():
    from actors.group import balance_groups

    groups = [[0, 1, 2, 3], [4], [5, 6], [7, 8, 9]]
    costs = [100.0, 10.0, 60.0, 50.0]
    out = balance_groups(groups, costs, 2)
    # largest first onto the least loaded: 100 -> 0; 60 -> 1; 50 -> 1 (60 < 100); 10 -> 0 (100 < 110)
    assert out == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    assert balance_groups(groups, costs, 5)[4] == []  # more ranks than groups: some get none
    with pytest.raises(ValueError, match="4 groups but 3 costs"):
        balance_groups(groups, costs[:3], 2)


def test_pack_micro_batches_by_answers_or_by_token_budget():
    from actors.group import pack_micro_batches

    groups = [[0, 1, 2], [3, 4]]
    prompt = [100, 50]
    ans = [10, 20, 30, 5, 5]
    # no budget: micro_batch_size answers at a time, groups in order
    assert pack_micro_batches(groups, prompt, ans, max_answers=2) == [[0, 1], [2, 3], [4]]
    # shared prefix, budget 170: group 0 costs 100 + 60 = 160, group 1 costs 60: one each
    assert pack_micro_batches(groups, prompt, ans, max_answers=2, max_tokens=170) == [[0, 1, 2], [3, 4]]
    # budget 230: both groups fit in one micro-batch (220)
    assert pack_micro_batches(groups, prompt, ans, max_answers=2, max_tokens=230) == [[0, 1, 2, 3, 4]]
    # budget 135: group 0 is split into pieces that each repeat its prompt: 100+10+20, 100+30;
    # group 1 (60) joins the second piece? 130 + 60 > 135: no, its own
    assert pack_micro_batches(groups, prompt, ans, max_answers=2, max_tokens=135) == [[0, 1], [2], [3, 4]]
    # per answer (not shared): every answer carries its prompt: 110, 120, 130, 55, 55 ->
    # 110 + 120 = 230; 130 + 55 + 55 = 240 (the budget, exactly)
    assert pack_micro_batches(groups, prompt, ans, max_answers=2, max_tokens=240, shared=False) == [[0, 1], [2, 3, 4]]
    with pytest.raises(ValueError, match="cannot hold one answer: its prompt has 100 tokens and the answer 30"):
        pack_micro_batches(groups, prompt, ans, max_answers=2, max_tokens=120)
