"""Shared fixtures. The tiny model and synthetic data are built once per test session."""

import os

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from rlsys.models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory):
    from rlsys.data import synthetic

    out = tmp_path_factory.mktemp("synthetic")
    synthetic.generate(out, num_images=48, seed=0, split="train")
    synthetic.generate(out, num_images=16, seed=0, split="val")
    return out


@pytest.fixture(scope="session")
def sft_run(tmp_path_factory):
    """SFT of the tiny model for 400 steps through Ray Train, as a user runs it (its own
    process), on the tasks whose answer is always a box (referring, visual prompts: no None
    targets), so the policy writes boxes and GRPO's rewards vary. 400 steps, not fewer: at 150
    the model still wrote three coordinates a box (the real scorer gave 0 to every answer, no
    signal for a learning test); at 400 it writes four, and the paper's reward on visual
    prompts at temperature 0.7 is ~0.04, with a spread GRPO can climb. Shared by the end-to-end
    and the distributed GRPO tests. Returns (out_dir, stdout)."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "WANDB_MODE": "offline", "PYTHONPATH": str(repo)}
    out = tmp_path_factory.mktemp("sft")
    args = [
        "rlsys.sft",
        f"run.out_dir={out}",
        "train.steps=400",
        "train.log_every_steps=25",
        "train.checkpoint_every_steps=200",
        "data.synthetic_train_images=400",
        "tracking.mode=offline",
        "data.tasks=[referring,visual_prompt]",
    ]
    r = subprocess.run([sys.executable, "-m", *args], cwd=out, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"rlsys.sft failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return out, r.stdout


class _RaySession:
    """One Ray instance for the modules that use Ray in this process, and one two-node cluster
    for the tests that need nodes: each started once, when first asked for, instead of once per
    module (a start is ~10 s of the 2-core machine; the cluster's more). The test order puts the
    modules that share each together (:func:`pytest_collection_modifyitems`), so each starts at
    most once. A module must leave no actors or placement groups behind (shut its groups down):
    the next module gets the same resources."""

    def __init__(self):
        self.kind: str | None = None
        self.cluster = None

    def local(self) -> None:
        import sys

        import ray

        if self.kind == "local" and ray.is_initialized():
            return
        self.shutdown()
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu", "PYTHONPATH": ":".join(sys.path)}},
        )
        self.kind = "local"

    def two_nodes(self):
        import ray

        if self.kind == "cluster" and ray.is_initialized():
            return self.cluster
        self.shutdown()
        from rlsys.bench.soak import two_node_cluster

        self.cluster, self.kind = two_node_cluster(), "cluster"
        return self.cluster

    def shutdown(self) -> None:
        import sys

        if "ray" in sys.modules:
            sys.modules["ray"].shutdown()
        if self.cluster is not None:
            self.cluster.shutdown()
        self.kind, self.cluster = None, None


@pytest.fixture(scope="session")
def ray_session():
    s = _RaySession()
    yield s
    s.shutdown()


@pytest.fixture(scope="module")
def ray_local(ray_session):
    """This process connected to the suite's one local Ray instance (2 CPUs)."""
    os.environ["DS_ACCELERATOR"] = "cpu"
    ray_session.local()


@pytest.fixture(scope="module")
def cluster(ray_session):
    """The two-node local cluster of :func:`rlsys.bench.soak.two_node_cluster` (head: engines and
    reward workers, ``rollout_node``; second node: learner ranks, ``learner_node``), shared by
    the modules that take it."""
    return ray_session.two_nodes()


def _ray_group(item) -> int:
    """0: the rest; 1: tests on the shared local Ray; 2: tests on the shared two-node cluster (last:
    while it runs, a `ray.init()` with no address anywhere on this machine would join it)."""
    names = set(getattr(item, "fixturenames", ()))
    params = set(getattr(getattr(item, "callspec", None), "params", {}))
    if "cluster" in names - params:
        return 2
    return 1 if "ray_local" in names else 0


def pytest_collection_modifyitems(config, items):
    items[:] = sorted(items, key=_ray_group)  # stable: each group keeps its files' order


# ---------------------------------------------------------------------------------------------
# The tiers: `make test-fast` runs what is not marked slow and must start no Ray, vLLM or
# DeepSpeed (its budget is a couple of minutes). A test outside the mark that leaves Ray or
# torch.distributed (DeepSpeed's process group) running in this process fails here, so the fast
# tier stays fast as tests are added.
# ---------------------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def _fast_tests_start_no_ray_or_deepspeed(request):
    import sys

    def ray_up() -> bool:
        return "ray" in sys.modules and sys.modules["ray"].is_initialized()

    before = ray_up()
    yield
    if request.node.get_closest_marker("slow"):
        return
    if ray_up() and not before:
        pytest.fail(f"{request.node.nodeid} started Ray without the `slow` mark (make test-fast must not)")
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        pytest.fail(f"{request.node.nodeid} started torch.distributed (DeepSpeed) without the `slow` mark")


def pytest_terminal_summary(terminalreporter):
    """Seconds per test file, slowest first, under pytest's own 25 slowest tests: where a change's
    cost lands, and what the 40-minute budget of `make test` is spent on."""
    per_file: dict[str, float] = {}
    for reports in terminalreporter.stats.values():
        for rep in reports:
            if getattr(rep, "when", None) in ("setup", "call", "teardown") and hasattr(rep, "duration"):
                f = rep.nodeid.split("::")[0]
                per_file[f] = per_file.get(f, 0.0) + rep.duration
    if not per_file:
        return
    total = sum(per_file.values())
    terminalreporter.write_sep("=", f"seconds per test file ({total / 60:.1f} min in tests)")
    for f, s in sorted(per_file.items(), key=lambda kv: -kv[1])[:20]:
        terminalreporter.write_line(f"{s:8.1f}s  {100 * s / total:5.1f}%  {f}")
