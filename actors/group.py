"""What the three actor groups (rollout, reward, learner) share: placement, sharding and calls
with a limit. Each group is a driver-side object owning its placement group, how a batch is
split over its members, a timeout on every call, and what a dead member costs; the controller
holds groups, never single actors.

Sharding helpers are pure (no Ray) so they are tested on their own.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


def actor_env(cpu_only: bool) -> dict:
    """Environment the actors need that the driver's does not already carry (a local cluster's
    workers inherit the driver's; under `ray job submit` the job's runtime env provides its own,
    and Ray refuses a driver that sets a variable the job already sets): the repository on
    PYTHONPATH, and DeepSpeed's CPU accelerator when no GPU is used."""
    wanted = {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    if cpu_only:
        wanted["DS_ACCELERATOR"] = "cpu"
    return {k: v for k, v in wanted.items() if k not in os.environ}


class MemberFailed(RuntimeError):
    """A group member died or did not answer in time; ``member`` is its index in the group."""

    def __init__(self, group: str, member: int, what: str, cause: BaseException | str):
        self.group, self.member, self.what = group, member, what
        super().__init__(f"{group} member {member} failed during {what}: {cause}")


def bundle(cpus: float, gpus: float = 0.0, resources: dict | None = None) -> dict:
    """One placement-group bundle: CPUs, GPUs when asked, and any custom node resources (a label
    such as ``{"learner_node": 1}`` pins a group to the nodes that advertise it)."""
    b = {"CPU": float(cpus)}
    if gpus:
        b["GPU"] = float(gpus)
    b.update({k: float(v) for k, v in (resources or {}).items()})
    return b


def placement_group(name: str, bundles: list[dict], strategy: str, timeout_s: float):
    """Create and wait for a placement group; a clear error when the cluster cannot hold it."""
    import ray
    from ray.util.placement_group import placement_group as _pg

    pg = _pg(bundles, strategy=strategy, name="")
    ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
    if not ready:
        have = ray.cluster_resources()
        raise TimeoutError(
            f"the {name} group's placement group ({len(bundles)} x {bundles[0]}, {strategy}) was not placed within "
            f"{timeout_s:.0f} s; the cluster has {have}. Are its resources enough? An autoscaler may need longer "
            "(run.actor_start_timeout_s)"
        )
    return pg


def tear_down(members: list, pg) -> None:
    """Kill a group's members and free its placement group."""
    import ray
    from ray.util.placement_group import remove_placement_group

    for m in members:
        ray.kill(m, no_restart=True)
    remove_placement_group(pg)


def in_bundle(pg, index: int):
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=index)


def call(refs, timeout_s: float, what: str):
    """``ray.get`` with a limit and a message that says what did not finish."""
    import ray

    try:
        return ray.get(refs, timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        raise TimeoutError(f"{what} did not finish within {timeout_s:.0f} s") from None


def call_each(group: str, refs: list, timeout_s: float, what: str) -> list:
    """Wait for one call per member (all started already) within one deadline; the first member
    that died or ran past it is named in a :class:`MemberFailed`."""
    import time

    import ray

    deadline = time.monotonic() + timeout_s
    out = []
    for k, ref in enumerate(refs):
        ready, _ = ray.wait([ref], timeout=max(0.0, deadline - time.monotonic()))
        if not ready:
            raise MemberFailed(group, k, what, f"no answer within {timeout_s:.0f} s")
        try:
            out.append(ray.get(ref))
        except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as exc:
            raise MemberFailed(group, k, what, exc) from exc
    return out


# ----------------------------------------------------------------------------------------------
# Sharding (pure)
# ----------------------------------------------------------------------------------------------
def round_robin(n_items: int, n_members: int) -> list[list[int]]:
    """Item indices per member, dealt in turn: sizes differ by at most one."""
    return [list(range(k, n_items, n_members)) for k in range(n_members)]


def by_group(n_groups: int, group_size: int, n_members: int) -> list[list[int]]:
    """Flat item indices per member with every group's ``group_size`` items on one member, the
    groups dealt in turn (per-image state such as a SAM embedding is then computed once)."""
    out: list[list[int]] = [[] for _ in range(n_members)]
    for g in range(n_groups):
        out[g % n_members].extend(range(g * group_size, (g + 1) * group_size))
    return out


def micro_batch_plan(shard_sizes: list[int], micro_batch_size: int) -> int:
    """Micro-batches every rank runs in one update: enough for the largest shard, at least one.
    All ranks run the same number (ranks with less data run zero-weight micro-batches), because
    ZeRO-2 reduces gradients on every backward: unequal counts mismatch the collectives."""
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    return max(1, max((-(-s // micro_batch_size) for s in shard_sizes), default=1))
