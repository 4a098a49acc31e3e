"""Do a config's actor groups fit a cluster's node types, and on how many nodes? Pure arithmetic.

It mirrors what rlsys asks of Ray (rlsys/grpo/trainer.py) and how Ray's autoscaler answers:

- the learner ranks are one placement group, strategy PACK: all ranks on one node when a node can
  hold them (NCCL inside a node), spilling over several nodes only when none can (PACK is soft);
- the rollout engines are one placement group, strategy SPREAD (soft: spread where there is room);
- the reward workers are one placement group too, strategy SPREAD, one ``cpus_per_worker``
  bundle each, created after both groups.

Custom resources (``*.resources_per_*``, which pin groups to labelled nodes) are not modelled here:
the plan answers for CPUs and GPUs.

The autoscaler flattens PACK/SPREAD groups into bundle demands, first fits them into nodes that
already exist, then launches new nodes, avoiding GPU node types for CPU-only demand
(``resource_demand_scheduler``). :func:`plan` does the same greedily, in the order rlsys asks:
learner, rollout, rewards. It answers whether everything fits within each node type's
``max_workers`` and how many nodes of each type that takes; it is an estimate of the
autoscaler's choice, exact about what cannot fit.

No Ray import: tests/test_cluster.py runs it on the shipped configs and node types.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rlsys.config import load_config

_EPS = 1e-9  # Ray keeps resources in fixed point (1e-4); float sums like 0.5 x 3 need slack


@dataclass(frozen=True)
class NodeType:
    """A kind of node a cluster may have: its Ray resources and autoscaling bounds."""

    name: str
    cpus: float
    gpus: float = 0.0
    max_workers: int = 1
    min_workers: int = 0
    head: bool = False  # the head exists once, from the start, and is not a worker


@dataclass(frozen=True)
class Group:
    """Bundles ({"CPU": c, "GPU": g}) asked for together; ``pack``: prefer one node for all."""

    name: str
    bundles: tuple[dict, ...]
    pack: bool = False


@dataclass
class Plan:
    fits: bool
    nodes: dict[str, int]  # node type -> nodes running (head and min_workers included)
    placement: dict[str, list[str]]  # group -> node ("type#index") of each bundle
    message: str


@dataclass
class _Node:
    type: NodeType
    index: int
    cpus: float
    gpus: float
    groups: set = field(default_factory=set)

    @property
    def label(self) -> str:
        return f"{self.type.name}#{self.index}"

    def holds(self, need: dict) -> bool:
        return self.cpus + _EPS >= need.get("CPU", 0.0) and self.gpus + _EPS >= need.get("GPU", 0.0)

    def take(self, need: dict, group: str) -> None:
        self.cpus -= need.get("CPU", 0.0)
        self.gpus -= need.get("GPU", 0.0)
        self.groups.add(group)


def _bundle(cpus: float, gpus: float) -> dict:
    return {"CPU": float(cpus), **({"GPU": float(gpus)} if gpus else {})}


def grpo_groups(cfg) -> list[Group]:
    """The three actor groups of a :class:`rlsys.config.GRPOConfig`, as rlsys/grpo/trainer.py requests them."""
    le, ro, rw = cfg.learner, cfg.rollout, cfg.reward
    return [
        Group("learner", (_bundle(le.cpus_per_rank, le.gpus_per_rank),) * le.num_ranks, pack=True),
        Group("rollout", (_bundle(ro.cpus_per_engine, ro.gpus_per_engine),) * ro.num_engines),
        Group("reward", (_bundle(rw.cpus_per_worker, 0),) * rw.num_workers),
    ]


def sft_groups(num_workers: int, cpus_per_worker: float, use_gpu: bool) -> list[Group]:
    """Ray Train's workers for ``python -m rlsys.sft``: one PACK placement group (Ray Train's default)."""
    return [Group("sft", (_bundle(cpus_per_worker, 1 if use_gpu else 0),) * num_workers, pack=True)]


def _total(bundles) -> dict:
    return {"CPU": sum(b.get("CPU", 0.0) for b in bundles), "GPU": sum(b.get("GPU", 0.0) for b in bundles)}


def _fmt(need: dict) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in need.items() if v) + "}"


def plan(groups: list[Group], node_types: list[NodeType], max_workers: int | None = None) -> Plan:
    """Place ``groups`` in order on nodes of ``node_types``; ``max_workers``: the cluster-wide
    bound on worker nodes (a launcher config's top-level ``max_workers``), if any."""
    nodes: list[_Node] = []
    count = {t.name: 0 for t in node_types}
    notes: list[str] = []

    def open_node(t: NodeType) -> _Node:
        n = _Node(t, count[t.name], t.cpus, t.gpus)
        count[t.name] += 1
        nodes.append(n)
        return n

    for t in node_types:  # what runs before any demand: the head and each type's min_workers
        for _ in range(1 if t.head else t.min_workers):
            open_node(t)

    def workers() -> int:
        return sum(count[t.name] for t in node_types if not t.head)

    def new_node(need: dict) -> _Node | None:
        room = max_workers is None or workers() < max_workers
        cands = [
            t
            for t in node_types
            if not t.head
            and room
            and count[t.name] < t.max_workers
            and t.cpus + _EPS >= need.get("CPU", 0.0)
            and t.gpus + _EPS >= need.get("GPU", 0.0)
        ]
        if not cands:
            return None
        cpu_only = not need.get("GPU")
        # the autoscaler's order: no GPU node for CPU-only demand, then the smallest node that fits
        best = min(cands, key=lambda t: (cpu_only and t.gpus > 0, t.gpus, t.cpus, t.name))
        return open_node(best)

    def existing(need: dict) -> _Node | None:
        fit = [n for n in nodes if n.holds(need)]
        if not fit:
            return None
        cpu_only = not need.get("GPU")
        return min(fit, key=lambda n: (cpu_only and n.type.gpus > 0, nodes.index(n)))

    def why_not(need: dict) -> str:
        big = [t for t in node_types if t.cpus + _EPS >= need.get("CPU", 0.0) and t.gpus + _EPS >= need.get("GPU", 0.0)]
        if not big:
            sizes = ", ".join(f"{t.name} {_fmt({'CPU': t.cpus, 'GPU': t.gpus})}" for t in node_types)
            return f"no node type is large enough ({sizes})"
        used = ", ".join(f"{t.name} {count[t.name]}/{1 if t.head else t.max_workers}" for t in big)
        extra = (
            f"; cluster max_workers {max_workers} reached"
            if max_workers is not None and workers() >= max_workers
            else ""
        )
        return f"the node types that could hold it are full and at their max_workers ({used}{extra})"

    placement: dict[str, list[str]] = {}
    for g in groups:
        where: list[str] = []
        if g.pack and g.bundles:
            whole = _total(g.bundles)
            n = existing(whole) or new_node(whole)
            if n is not None:
                for b in g.bundles:
                    n.take(b, g.name)
                placement[g.name] = [n.label] * len(g.bundles)
                continue
            notes.append(
                f"{g.name}: no single node holds all {len(g.bundles)} bundles {_fmt(whole)}, "
                "so PACK spreads them over several nodes (cross-node collectives)"
            )
        for i, b in enumerate(g.bundles):
            n = existing(b) or new_node(b)
            if n is None:
                return Plan(
                    False,
                    {k: v for k, v in count.items() if v},
                    placement,
                    f"does not fit: {g.name} bundle {i + 1}/{len(g.bundles)} {_fmt(b)}: {why_not(b)}",
                )
            n.take(b, g.name)
            where.append(n.label)
        placement[g.name] = where

    used = {k: v for k, v in count.items() if v}
    msg = "fits on " + ", ".join(f"{v} x {k}" for k, v in used.items())
    for g in groups:
        spots = sorted(set(placement.get(g.name, [])))
        if spots:
            msg += f"; {g.name} on {', '.join(spots)}"
    return Plan(True, used, placement, msg + "".join(f". Note: {x}" for x in notes))


# ----------------------------------------------------------------------------------------------
# Node types from the cluster configs in cluster/
# ----------------------------------------------------------------------------------------------
def node_types_from_launcher(config: dict) -> tuple[list[NodeType], int | None]:
    """``ray up`` config (cluster/aws.yaml, cluster/gcp.yaml) -> node types and global max_workers."""
    head = config.get("head_node_type")
    out = []
    for name, t in config["available_node_types"].items():
        res = t.get("resources", {})
        out.append(
            NodeType(
                name,
                float(res.get("CPU", 0)),
                float(res.get("GPU", 0)),
                max_workers=1 if name == head else int(t.get("max_workers", config.get("max_workers", 0))),
                min_workers=int(t.get("min_workers", 0)),
                head=name == head,
            )
        )
    return out, config.get("max_workers")


def _k8s_cpu(q) -> float:
    s = str(q)
    return float(s[:-1]) / 1000 if s.endswith("m") else float(s)


def _group_resources(group: dict) -> tuple[float, float]:
    """What Ray advertises for a KubeRay group: rayStartParams num-cpus/num-gpus, else the first
    container's limits (Ray reads cpu and nvidia.com/gpu from them)."""
    params = group.get("rayStartParams") or {}
    limits = group["template"]["spec"]["containers"][0].get("resources", {}).get("limits", {})
    cpus = _k8s_cpu(params["num-cpus"]) if "num-cpus" in params else _k8s_cpu(limits.get("cpu", 0))
    gpus = float(params["num-gpus"]) if "num-gpus" in params else float(limits.get("nvidia.com/gpu", 0))
    return cpus, gpus


def node_types_from_raycluster(spec: dict) -> list[NodeType]:
    """A RayCluster ``spec`` (or a RayJob's rayClusterSpec) -> node types, one per group."""
    cpus, gpus = _group_resources(spec["headGroupSpec"])
    out = [NodeType("head", cpus, gpus, max_workers=1, head=True)]
    for g in spec.get("workerGroupSpecs", []):
        cpus, gpus = _group_resources(g)
        out.append(
            NodeType(
                g["groupName"], cpus, gpus, max_workers=int(g["maxReplicas"]), min_workers=int(g.get("minReplicas", 0))
            )
        )
    return out


def main(argv=None) -> int:
    """python -m actors.placement CONFIG.yaml CLUSTER.yaml: does a GRPO config fit a cluster config?"""
    import sys

    import yaml

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print(
            "usage: python -m actors.placement CONFIG.yaml (cluster/aws.yaml | cluster/gcp.yaml | cluster/kuberay/*.yaml)",
            file=sys.stderr,
        )
        return 2
    cfg = load_config(args[0])
    doc = yaml.safe_load(open(args[1]))
    if "available_node_types" in doc:
        types, max_workers = node_types_from_launcher(doc)
    else:
        spec = doc["spec"]
        spec = spec.get("rayClusterSpec") or spec.get("rayClusterConfig") or spec
        types, max_workers = node_types_from_raycluster(spec), None
    p = plan(grpo_groups(cfg), types, max_workers)
    print(p.message)
    return 0 if p.fits else 1


if __name__ == "__main__":
    raise SystemExit(main())
