"""The cluster configs, checked offline: every YAML parses; Ray's own launcher validation accepts
cluster/aws.yaml and cluster/gcp.yaml; the KubeRay manifests carry the fields their CRDs require;
the shipped GRPO configs load; and the actor groups of each real config fit the node types the
cluster configs define (computed by actors.placement, checked by hand on small cases first)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from actors.placement import (
    NodeType,
    grpo_groups,
    node_types_from_launcher,
    node_types_from_raycluster,
    plan,
    sft_groups,
)
from rlsys.config import GRPOConfig, load_config

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster"
KUBERAY = CLUSTER / "kuberay"
LAUNCHERS = [CLUSTER / "aws.yaml", CLUSTER / "gcp.yaml"]
REAL_GRPO = ROOT / "configs" / "grpo_qwen2_5_vl_3b.yaml"
REAL_SFT = ROOT / "configs" / "sft_qwen2_5_vl_3b.yaml"


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _all_yaml() -> list[Path]:
    return sorted([*CLUSTER.rglob("*.yaml"), *CLUSTER.rglob("*.yml"), *(ROOT / "configs").glob("*.yaml")])


# ----------------------------------------------------------------------------------------------
# Parsing and Ray's launcher schema
# ----------------------------------------------------------------------------------------------
def test_the_expected_files_are_shipped():
    names = {p.relative_to(ROOT).as_posix() for p in _all_yaml()}
    assert {
        "cluster/aws.yaml",
        "cluster/gcp.yaml",
        "cluster/kuberay/raycluster.yaml",
        "cluster/kuberay/rayjob.yaml",
        "cluster/kuberay/rayservice.yaml",
        "configs/grpo_qwen2_5_vl_3b.yaml",
        "configs/sft_qwen2_5_vl_3b.yaml",
        "configs/grpo_qwen3_vl_4b.yaml",
        "configs/sft_qwen3_vl_4b.yaml",
        "configs/serve_qwen3_vl.yaml",
        "configs/tiny_cpu.yaml",
    } <= names
    assert (CLUSTER / "README.md").is_file()


@pytest.mark.parametrize("path", _all_yaml(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_yaml_parses_to_mappings(path):
    docs = list(yaml.safe_load_all(path.read_text()))
    assert docs and all(isinstance(d, dict) and d for d in docs), f"{path}: expected non-empty mappings"


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
def test_launcher_config_passes_rays_own_validation(path):
    # What `ray up` does before it touches a cloud (commands._bootstrap_config): merge the
    # provider's defaults.yaml and fill per-type bounds (prepare_config), then check against
    # ray-schema.json and Ray's consistency rules (validate_config). Neither contacts the cloud.
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(_load(path))
    validate_config(config)
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0}, "actors stay off the head"
    gpu = [n for n, t in types.items() if t["resources"].get("GPU", 0) == 8]
    cpu = [n for n, t in types.items() if n != config["head_node_type"] and not t["resources"].get("GPU")]
    assert len(gpu) >= 2 and len(cpu) >= 2, "8-GPU types for learning and rollout, CPU types for rewards and SAM"
    assert all(types[n]["min_workers"] == 0 for n in gpu), "GPU nodes start only on demand"
    assert config["idle_timeout_minutes"] >= 5
    assert sum(t["max_workers"] for n, t in types.items() if n != config["head_node_type"]) <= config["max_workers"]
    setup = "\n".join(config["setup_commands"])
    assert 'pip install -e ".[gpu]"' in setup and "git clone https://github.com/REPLACE_ME/" in setup


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.name)
def test_rays_validation_catches_a_misspelt_field(path):
    # The check above has teeth: Ray's schema forbids unknown keys in a node type.
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = _load(path)
    t = next(n for n, v in config["available_node_types"].items() if v["resources"].get("GPU"))
    config["available_node_types"][t]["max_worker"] = config["available_node_types"][t].pop("max_workers")
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        validate_config(prepare_config(config))


# ----------------------------------------------------------------------------------------------
# KubeRay manifests: the fields the ray.io/v1 CRDs require
# ----------------------------------------------------------------------------------------------
GPU = "nvidia.com/gpu"


def _pod_errors(template, where: str) -> list[str]:
    containers = ((template or {}).get("spec") or {}).get("containers")
    if not isinstance(containers, list) or not containers:
        return [f"{where}.template.spec.containers: missing or empty"]
    errs = []
    for i, c in enumerate(containers):
        if not c.get("name") or not c.get("image"):
            errs.append(f"{where} container {i}: name and image are required")
        res = c.get("resources") or {}
        req, lim = res.get("requests") or {}, res.get("limits") or {}
        # Kubernetes schedules extended resources from limits; a request must equal its limit.
        if GPU in req and req[GPU] != lim.get(GPU):
            errs.append(f"{where} container {i}: {GPU} request {req[GPU]} without an equal limit")
    return errs


def _gpus(group: dict) -> int:
    return sum(
        int((c.get("resources") or {}).get("limits", {}).get(GPU, 0)) for c in group["template"]["spec"]["containers"]
    )


def _cluster_spec_errors(spec, where: str) -> list[str]:
    if not isinstance(spec, dict):
        return [f"{where}: missing"]
    errs = []
    head = spec.get("headGroupSpec")
    if not isinstance(head, dict):
        return [f"{where}.headGroupSpec: missing"]
    if not isinstance(head.get("rayStartParams"), dict):
        errs.append(f"{where}.headGroupSpec.rayStartParams: missing")
    errs += _pod_errors(head.get("template"), f"{where}.headGroupSpec")
    groups = spec.get("workerGroupSpecs")
    if not isinstance(groups, list) or not groups:
        return errs + [f"{where}.workerGroupSpecs: missing or empty"]
    names = [g.get("groupName") for g in groups]
    if len(set(names)) != len(names):
        errs.append(f"{where}: groupName values must be unique ({names})")
    for g in groups:
        w = f"{where}.workerGroupSpecs[{g.get('groupName')}]"
        for k in ("groupName", "minReplicas", "maxReplicas", "replicas", "template", "rayStartParams"):
            if k not in g:
                errs.append(f"{w}.{k}: missing")
        lo, hi, n = g.get("minReplicas"), g.get("maxReplicas"), g.get("replicas")
        if all(isinstance(x, int) for x in (lo, hi, n)) and not 0 <= lo <= n <= hi:
            errs.append(f"{w}: need 0 <= minReplicas <= replicas <= maxReplicas, got {lo}, {n}, {hi}")
        errs += _pod_errors(g.get("template"), w)
        if "gpu" in str(g.get("groupName")) and not errs and _gpus(g) < 1:
            errs.append(f"{w}: a GPU group whose containers do not request {GPU}")
    return errs


def _manifest(name: str, kind: str) -> dict:
    doc = _load(KUBERAY / name)
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == kind and doc["metadata"]["name"]
    return doc


def test_raycluster_manifest():
    doc = _manifest("raycluster.yaml", "RayCluster")
    spec = doc["spec"]
    assert _cluster_spec_errors(spec, "spec") == []
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    gpu_groups = [g for g in spec["workerGroupSpecs"] if _gpus(g)]
    assert len(gpu_groups) >= 2 and all(_gpus(g) == 8 for g in gpu_groups)
    assert all(g["minReplicas"] == 0 for g in spec["workerGroupSpecs"]), "workers start only on demand"


def test_the_spec_checks_catch_what_the_crds_reject():
    spec = copy.deepcopy(_load(KUBERAY / "raycluster.yaml")["spec"])
    del spec["workerGroupSpecs"][0]["maxReplicas"]
    spec["workerGroupSpecs"][1]["template"]["spec"]["containers"][0]["resources"]["limits"].pop(GPU)
    del spec["headGroupSpec"]["template"]["spec"]["containers"]
    errs = _cluster_spec_errors(spec, "spec")
    assert any("maxReplicas: missing" in e for e in errs)
    assert any("rollout-gpu" in e and GPU in e for e in errs)
    assert any("headGroupSpec.template.spec.containers" in e for e in errs)


def test_rayjob_manifest_runs_grpo_on_the_same_cluster():
    doc = _manifest("rayjob.yaml", "RayJob")
    spec = doc["spec"]
    assert spec["entrypoint"] == "python -m rlsys.grpo --config configs/grpo_qwen2_5_vl_3b.yaml"
    assert (ROOT / spec["entrypoint"].split("--config ")[1]).is_file()
    assert _cluster_spec_errors(spec["rayClusterSpec"], "spec.rayClusterSpec") == []
    # one cluster definition, two copies: they must not drift apart
    assert spec["rayClusterSpec"] == _load(KUBERAY / "raycluster.yaml")["spec"]
    # Ray refuses a driver whose ray.init(runtime_env) repeats an env var of the job's runtime_env,
    # and rlsys.grpo passes these to its actors itself.
    env = (yaml.safe_load(spec.get("runtimeEnvYAML", "")) or {}).get("env_vars", {})
    assert not {"DS_ACCELERATOR", "WANDB_MODE", "PYTHONPATH"} & set(env)


def test_rayservice_manifest():
    doc = _manifest("rayservice.yaml", "RayService")
    spec = doc["spec"]
    assert isinstance(spec["serveConfigV2"], str), "serveConfigV2 is a YAML string in the CRD"
    serve = yaml.safe_load(spec["serveConfigV2"])
    # the same Serve config as cluster/serve_gpu.yaml (`serve deploy` on a `ray up` cluster)
    assert serve == _load(CLUSTER / "serve_gpu.yaml")
    apps = serve["applications"]
    assert apps and all(a["name"] and ":" in a["import_path"] for a in apps)
    assert apps[0]["import_path"] == "rlsys.serve:app_builder"
    # the application's args load through rlsys.serve's own schema (as `serve deploy` would)
    from rlsys.serve.app import AppArgs, load_serve_config

    args = AppArgs.model_validate(apps[0]["args"])
    serve_cfg = load_serve_config(args.config, args.overrides, args.checkpoint)
    assert serve_cfg.deployment.gpus_per_replica == 1
    cluster = spec["rayClusterConfig"]
    assert _cluster_spec_errors(cluster, "spec.rayClusterConfig") == []
    assert cluster["enableInTreeAutoscaling"] is True
    gpu_groups = [g for g in cluster["workerGroupSpecs"] if _gpus(g)]
    assert gpu_groups, "replicas run on GPU pods"
    # Serve's replica bound and the pods' bound agree (one GPU replica per GPU pod)
    assert serve_cfg.deployment.max_replicas <= sum(g["maxReplicas"] * _gpus(g) for g in gpu_groups)


# ----------------------------------------------------------------------------------------------
# The shipped GRPO configs
# ----------------------------------------------------------------------------------------------
def _is_grpo_config(path: Path) -> bool:
    # GRPO's sections only, and at least one that only GRPO has (SFT and Serve configs have others)
    keys = set(_load(path) or {})
    return keys <= set(GRPOConfig.model_fields) and bool(keys & {"rollout", "learner", "reward"})


GRPO_CONFIGS = sorted(p for p in (ROOT / "configs").glob("*.yaml") if _is_grpo_config(p))


def test_both_grpo_configs_are_found():
    assert {"tiny_cpu.yaml", "grpo_qwen2_5_vl_3b.yaml"} <= {p.name for p in GRPO_CONFIGS}


@pytest.mark.parametrize("path", GRPO_CONFIGS, ids=lambda p: p.name)
def test_shipped_grpo_config_loads(path):
    assert isinstance(load_config(path), GRPOConfig)


@pytest.mark.parametrize("name", ["grpo_qwen2_5_vl_3b", "grpo_qwen3_vl_4b"])
def test_real_grpo_config_has_the_papers_settings(name):
    cfg = load_config(ROOT / "configs" / f"{name}.yaml")
    assert cfg.rollout.samples_per_prompt == 8 and cfg.learner.kl_coef == 0.01  # section 4.2.4
    assert cfg.samples_per_step == 64  # "batch size of 64": 8 prompts x 8 rollouts per update
    assert cfg.model.path.startswith("/") and cfg.model.coord_tokens == "map_last" and cfg.model.dtype == "bfloat16"
    assert cfg.rollout.max_new_tokens >= 2048 and cfg.tracking.mode == "auto"
    assert (
        cfg.rollout.num_engines * cfg.rollout.gpus_per_engine + cfg.learner.num_ranks * cfg.learner.gpus_per_rank == 8
    )


def test_qwen3_vl_configs_budget_its_32_px_tokens():
    """The paper's 2,560 image tokens at Qwen3-VL's 32 x 32 px per token, in both stages."""
    for name in ("grpo_qwen3_vl_4b", "sft_qwen3_vl_4b"):
        model = _load(ROOT / "configs" / f"{name}.yaml")["model"]
        assert model["max_pixels"] == 2560 * 32 * 32 and model["min_pixels"] == 16 * 32 * 32, name


@pytest.mark.parametrize("name", ["sft_qwen2_5_vl_3b", "sft_qwen3_vl_4b"])
def test_real_sft_values_are_the_papers(name):
    # Raw values only: the SFT schema (rlsys.sft) validates the file itself.
    train = _load(ROOT / "configs" / f"{name}.yaml")["train"]
    assert (train["lr_vision"], train["lr_projector"], train["lr_llm"]) == (2e-6, 2e-5, 2e-5)
    assert (train["warmup_fraction"], train["weight_decay"]) == (0.03, 0.01)


# ----------------------------------------------------------------------------------------------
# Placement: hand-worked cases
# ----------------------------------------------------------------------------------------------
HEAD = NodeType("head", cpus=0, head=True)
GPU8 = NodeType("gpu8", cpus=96, gpus=8, max_workers=2)
CPU32 = NodeType("cpu32", cpus=32, max_workers=4)


def _cfg(engines=4, ranks=4, rewards=8, cpus=8.0, reward_cpus=2.0, gpus=1.0) -> GRPOConfig:
    return GRPOConfig.model_validate(
        {
            "rollout": {"num_engines": engines, "gpus_per_engine": gpus, "cpus_per_engine": cpus},
            "learner": {"num_ranks": ranks, "gpus_per_rank": gpus, "cpus_per_rank": cpus},
            "reward": {"num_workers": rewards, "cpus_per_worker": reward_cpus},
        }
    )


def test_one_gpu_node_holds_all_three_groups():
    # learner 4 x {8 CPU, 1 GPU} + rollout 4 x {8, 1} = {64, 8} on gpu8#0, leaving 32 CPUs;
    # rewards 8 x 2 = 16 CPUs go there too (existing nodes first): one GPU node, no CPU node.
    p = plan(grpo_groups(_cfg()), [HEAD, GPU8, CPU32])
    assert p.fits, p.message
    assert p.nodes == {"head": 1, "gpu8": 1}
    assert set(p.placement["learner"]) == set(p.placement["reward"]) == {"gpu8#0"}


def test_exactly_fits():
    # gpu node of exactly {64 CPU, 8 GPU}: learner + rollout = {64, 8}, nothing left;
    # 16 rewards x 2 CPUs = 32 = exactly one cpu32 node (not a second GPU node: CPU-only demand).
    gpu64 = NodeType("gpu64", cpus=64, gpus=8, max_workers=1)
    p = plan(grpo_groups(_cfg(rewards=16)), [HEAD, gpu64, CPU32])
    assert p.fits, p.message
    assert p.nodes == {"head": 1, "gpu64": 1, "cpu32": 1}
    # one more reward worker needs a second cpu32 node; with max_workers 1 it does not fit
    p = plan(grpo_groups(_cfg(rewards=17)), [HEAD, gpu64, NodeType("cpu32", cpus=32, max_workers=1)])
    assert not p.fits and "reward bundle 17/17" in p.message and "cpu32 1/1" in p.message


def test_tiny_cpu_config_fits_the_two_cpu_head_of_the_job_submit_test():
    # 0.5 (engine) + 0.5 (rank) + 0.5 (reward) = 1.5 CPUs <= 2; and on 1.5 exactly, still fits
    cfg = load_config(ROOT / "configs" / "tiny_cpu.yaml")
    assert plan(grpo_groups(cfg), [NodeType("local", cpus=2, head=True)]).fits
    assert plan(grpo_groups(cfg), [NodeType("local", cpus=1.5, head=True)]).fits
    p = plan(grpo_groups(cfg), [NodeType("local", cpus=1.4, head=True)])
    assert not p.fits and p.message.startswith("does not fit: reward")


def test_does_not_fit_when_gpu_nodes_run_out():
    # 8 ranks + 8 engines = 16 GPUs = 2 gpu8 nodes; with max_workers 1 the rollout group cannot start
    p = plan(grpo_groups(_cfg(engines=8, ranks=8)), [HEAD, NodeType("gpu8", 96, 8, max_workers=1), CPU32])
    assert not p.fits
    assert p.message.startswith("does not fit: rollout bundle 1/8 {CPU: 8, GPU: 1}")
    assert "gpu8 1/1" in p.message
    # the cluster-wide bound counts too
    p = plan(grpo_groups(_cfg(engines=8, ranks=8)), [HEAD, GPU8, CPU32], max_workers=1)
    assert not p.fits and "cluster max_workers 1 reached" in p.message


def test_does_not_fit_when_no_node_type_is_large_enough():
    p = plan(grpo_groups(_cfg(cpus=128)), [HEAD, GPU8, CPU32])
    assert not p.fits and "learner bundle 1/4" in p.message and "no node type is large enough" in p.message


def test_pack_keeps_the_learner_on_one_node():
    # learner 8 x {8, 1} = {64, 8} fills gpu8#0; the 4 engines then need gpu8#1
    p = plan(grpo_groups(_cfg(engines=4, ranks=8)), [HEAD, GPU8, CPU32])
    assert p.fits and p.nodes["gpu8"] == 2
    assert set(p.placement["learner"]) == {"gpu8#0"} and set(p.placement["rollout"]) == {"gpu8#1"}


def test_pack_spills_over_when_no_node_holds_the_group():
    # 12 ranks: no 8-GPU node holds them, so PACK (soft) places 8 + 4 over two nodes, and says so
    p = plan(grpo_groups(_cfg(engines=1, ranks=12)), [HEAD, GPU8, CPU32])
    assert p.fits and p.placement["learner"].count("gpu8#0") == 8 and p.placement["learner"].count("gpu8#1") == 4
    assert "PACK spreads" in p.message


# ----------------------------------------------------------------------------------------------
# Placement: the real configs on the node types of cluster/
# ----------------------------------------------------------------------------------------------
def _cluster_node_types():
    out = {}
    for path in LAUNCHERS:
        out[path.name] = node_types_from_launcher(_load(path))
    out["raycluster.yaml"] = (node_types_from_raycluster(_load(KUBERAY / "raycluster.yaml")["spec"]), None)
    return out


CLUSTERS = _cluster_node_types()


def test_node_types_are_read_from_the_cluster_configs():
    types, max_workers = CLUSTERS["aws.yaml"]
    by = {t.name: t for t in types}
    assert by["head"].head and by["head"].cpus == 0 and max_workers == 12
    assert (by["learner_gpu"].cpus, by["learner_gpu"].gpus, by["learner_gpu"].max_workers) == (96, 8, 4)
    by = {t.name: t for t in CLUSTERS["raycluster.yaml"][0]}
    assert by["head"].cpus == 0  # rayStartParams num-cpus "0" wins over the container's 16
    assert (by["rollout-gpu"].cpus, by["rollout-gpu"].gpus, by["rollout-gpu"].max_workers) == (90, 8, 2)


@pytest.mark.parametrize("cluster", sorted(CLUSTERS))
def test_real_grpo_config_fits_one_gpu_node(cluster):
    types, max_workers = CLUSTERS[cluster]
    p = plan(grpo_groups(load_config(REAL_GRPO)), types, max_workers)
    assert p.fits, f"{cluster}: {p.message}"
    gpu_types = {t.name for t in types if t.gpus}
    assert sum(n for k, n in p.nodes.items() if k in gpu_types) == 1, p.message  # as the paper: 8 GPUs
    assert len(set(p.placement["learner"])) == 1, "PACK: all learner ranks on one node"


@pytest.mark.parametrize("cluster", sorted(CLUSTERS))
def test_real_sft_config_fits(cluster):
    train = _load(REAL_SFT)["train"]  # raw values (Ray Train: one PACK group of num_workers)
    types, max_workers = CLUSTERS[cluster]
    p = plan(sft_groups(train["num_workers"], train["cpus_per_worker"], train["use_gpu"]), types, max_workers)
    assert p.fits, f"{cluster}: {p.message}"
    assert sum(n for k, n in p.nodes.items() if k != "head") == -(-train["num_workers"] // 8)
