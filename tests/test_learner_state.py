"""The learner's exported tensors own their memory: under ZeRO the parameters are views into one
flat buffer, and pickling a view (what Ray does to an actor's return value) writes the whole
buffer. Run in a subprocess: DeepSpeed initialises torch.distributed for the whole process."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

SCRIPT = r"""
import json, pickle, sys
from actors.learner import LearnerWorker
w = LearnerWorker.__ray_actor_class__(rank=0, world_size=1)
cfg = dict(lr=1e-4, weight_decay=0.0, micro_batch_size=1, grad_clip=1.0, zero_stage=2, kl_coef=0.0,
           gpus_per_rank=0, clip_low=0.2, clip_high=0.28)
w.setup(sys.argv[1], cfg, master_addr="127.0.0.1", master_port=int(sys.argv[2]), micro_batches_per_step=1, seed=0)
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
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(tiny_model_dir), str(port)], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    # the premise: ZeRO did make the parameters views into a larger buffer
    assert res["flat_views"] > 0, res
    # pickles carry the tensors' own bytes plus a small header each, not copies of the flat buffer
    assert res["pickled"] < 1.1 * res["data"] + 2000 * 60, res
