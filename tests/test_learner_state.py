"""The learner's exported tensors own their memory: under ZeRO the parameters are views into one
flat buffer, and pickling a view (what Ray does to an actor's return value) writes the whole
buffer. Run in a subprocess: DeepSpeed initialises torch.distributed for the whole process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # each test starts DeepSpeed (in a subprocess): not the fast tier

REPO = Path(__file__).resolve().parent.parent

SCRIPT = r"""
import json, pickle, sys
from actors.learner import LearnerWorker
w = LearnerWorker.__ray_actor_class__(rank=0, world_size=1)
from rlsys.config import LearnerConfig
cfg = LearnerConfig(lr=1e-4, weight_decay=0.0, micro_batch_size=1, grad_clip=1.0, zero_stage=2, kl_coef=0.0,
           gpus_per_rank=0, clip_low=0.2, clip_high=0.28, is_cap=2.0)
w.setup(sys.argv[1], cfg, master_addr="127.0.0.1", master_port=int(sys.argv[2]), seed=0)
flat_views = sum(p.untyped_storage().nbytes() > p.numel() * p.element_size() for p in w.engine.module.parameters())
sd = w.state_dict_cpu()
print(json.dumps({"pickled": sum(len(pickle.dumps(t)) for t in sd.values()),
                  "data": sum(t.numel() * t.element_size() for t in sd.values()), "flat_views": flat_views}))
"""


def test_state_dict_export_pickles_only_its_own_data(tiny_model_dir):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO)}
    r = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tiny_model_dir), str(port)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    # the premise: ZeRO did make the parameters views into a larger buffer
    assert res["flat_views"] > 0, res
    # pickles carry the tensors' own bytes plus a small header each, not copies of the flat buffer
    assert res["pickled"] < 1.1 * res["data"] + 2000 * 60, res


FREEZE_SCRIPT = r"""
import json, sys, torch
from actors.learner import LearnerWorker
from rlsys.data.samples import load_dataset
from rlsys.lang.prompts import chat_prompt
from rlsys.models import param_part
w = LearnerWorker.__ray_actor_class__(rank=0, world_size=1)
from rlsys.config import LearnerConfig
from rlsys.grpo.records import LearnerItem
cfg = LearnerConfig(lr=1e-2, weight_decay=0.0, micro_batch_size=2, grad_clip=1.0, zero_stage=2, kl_coef=0.0,
                    gpus_per_rank=0, clip_low=0.2, clip_high=0.28, is_cap=2.0, freeze_vision=True)
w.setup(sys.argv[1], cfg, master_addr="127.0.0.1", master_port=int(sys.argv[2]), seed=0)
before = {n: p.detach().clone() for n, p in w.engine.module.named_parameters()}
s = load_dataset(sys.argv[3])[0]
prompt = chat_prompt(w.processor, "Detect circle.")
items = [LearnerItem(prompt=prompt, image=s.image, response_ids=ids, advantage=a)
         for ids, a in (([5, 6, 7], 1.0), ([8, 9], -1.0))]
w.train(items, num_tokens_global=5)  # kl_coef 0: no reference pass, the proximal policy from this forward
moved = {}
for n, p in w.engine.module.named_parameters():
    part = param_part(n)
    changed = not torch.equal(before[n], p.detach())
    moved.setdefault(part, []).append(changed)
print(json.dumps({"trainable": w.trainable_params, "total": sum(p.numel() for p in w.engine.module.parameters()),
                  "moved": {k: [sum(v), len(v)] for k, v in moved.items()}}))
"""


def test_freeze_vision_keeps_the_vision_encoder_fixed_and_trains_the_rest(tiny_model_dir, synthetic_dir):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO)}
    r = subprocess.run(
        [sys.executable, "-c", FREEZE_SCRIPT, str(tiny_model_dir), str(port), str(synthetic_dir / "train.jsonl")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    moved = res["moved"]
    assert set(moved) == {"vision", "projector", "llm"}, res
    assert moved["vision"][0] == 0, res  # not one vision tensor changed
    # one update at lr 1e-2 moves the projector and the LLM (a few tensors, e.g. unused
    # embedding rows' owners, may see no gradient; most must move)
    assert moved["projector"][0] == moved["projector"][1], res
    assert moved["llm"][0] >= 0.8 * moved["llm"][1], res
    assert 0 < res["trainable"] < res["total"], res
