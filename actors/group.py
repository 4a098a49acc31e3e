"""What the three actor groups (rollout, reward, learner) share: placement, sharding and calls
with a limit (:class:`Members`, :func:`wait_members`). Each group is a driver-side object owning its placement group, how a batch is
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


def in_bundle(pg, index: int):
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=index)


def wait_members(group: str, refs: dict[int, object], timeout_s: float, what: str) -> dict[int, object]:
    """The one deadline wait: calls already started, one per member (keyed by the member's
    index), waited for together within ``timeout_s``. Returns each member's result, or a
    :class:`MemberFailed` naming the member that died, raised or was late. Never raises, so each
    group applies its own failure policy (restart and retry, replace and retry, or stop)."""
    import ray

    if not refs:
        return {}
    ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
    done = set(ready)
    out: dict[int, object] = {}
    for k, ref in refs.items():
        if ref not in done:
            out[k] = MemberFailed(group, k, what, f"no answer within {timeout_s:.0f} s")
            continue
        try:
            out[k] = ray.get(ref)
        except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as exc:
            out[k] = MemberFailed(group, k, what, exc)
    return out


def node_id(_actor) -> str:
    """The node an actor runs on (for :meth:`Members.inspect`)."""
    import ray

    return ray.get_runtime_context().get_node_id()


def call_each(group: str, refs: list, timeout_s: float, what: str, advice: str = "") -> list:
    """:func:`wait_members` for calls that must all succeed: the first failed member is raised
    (with ``advice``, what the user can do about it)."""
    res = wait_members(group, dict(enumerate(refs)), timeout_s, what)
    for k in range(len(refs)):
        if isinstance(res[k], MemberFailed):
            err = res[k]
            if advice:
                err.args = (f"{err.args[0]}. {advice}",)
            raise err
    return [res[k] for k in range(len(refs))]


class Members:
    """The shape every actor group has: one placement group, its members (member ``k`` in bundle
    ``k``), start-up, restart of member ``k`` in its own bundle, calls with one deadline, and
    shutdown. The rollout, reward and learner groups hold one and differ only in their failure
    policy. ``start(k, scheduling_strategy)`` creates member ``k``'s actor."""

    def __init__(self, name: str, bundles: list[dict], strategy: str, start_timeout_s: float, start):
        self.name, self._start, self.start_timeout_s = name, start, start_timeout_s
        self.pg = placement_group(name, bundles, strategy, start_timeout_s)
        self.handles = [start(k, in_bundle(self.pg, k)) for k in range(len(bundles))]
        self.restarts = 0

    def __len__(self) -> int:
        return len(self.handles)

    def each(self, refs: list, timeout_s: float, what: str, advice: str = "") -> list:
        return call_each(self.name, refs, timeout_s, what, advice)

    def wait(self, refs: dict[int, object], timeout_s: float, what: str) -> dict[int, object]:
        return wait_members(self.name, refs, timeout_s, what)

    def restart(self, k: int, ready: str | None = None) -> None:
        """Kill member ``k`` (its running calls die with it) and start a fresh one in its bundle;
        with ``ready`` (a method name), wait until the new member answers it."""
        import ray

        ray.kill(self.handles[k], no_restart=True)
        self.handles[k] = self._start(k, in_bundle(self.pg, k))
        self.restarts += 1
        if ready:
            self.each(
                [getattr(self.handles[k], ready).remote()], self.start_timeout_s, f"restarted member {k} start-up"
            )

    def inspect(self, fn, *args, timeout_s: float = 600.0) -> list:
        """``fn(actor_instance, *args)`` run inside every member (Ray's ``__ray_call__``): for
        tests and diagnostics, so the actors carry no RPCs of their own for them."""
        return self.each([h.__ray_call__.remote(fn, *args) for h in self.handles], timeout_s, f"inspect {fn.__name__}")

    def shutdown(self) -> None:
        """Kill the members and free the placement group."""
        import ray
        from ray.util.placement_group import remove_placement_group

        for h in self.handles:
            ray.kill(h, no_restart=True)
        remove_placement_group(self.pg)


# ----------------------------------------------------------------------------------------------
# Sharding (pure)
# ----------------------------------------------------------------------------------------------
def round_robin(n_items: int, n_members: int) -> list[list[int]]:
    """Item indices per member, dealt in turn: sizes differ by at most one."""
    return [list(range(k, n_items, n_members)) for k in range(n_members)]


def balance_groups(groups: list[list[int]], costs: list[float], n_members: int) -> list[list[int]]:
    """Item indices per member with each group (a list of item indices) whole on one member,
    members balanced by cost: the largest group first onto the least loaded member (ties: the
    lower member). Within a member, items keep the groups' order."""
    if len(groups) != len(costs):
        raise ValueError(f"{len(groups)} groups but {len(costs)} costs")
    load = [0.0] * n_members
    owner = [0] * len(groups)
    for g in sorted(range(len(groups)), key=lambda g: (-costs[g], g)):
        m = min(range(n_members), key=lambda k: (load[k], k))
        owner[g] = m
        load[m] += costs[g]
    out: list[list[int]] = [[] for _ in range(n_members)]
    for g, items in enumerate(groups):
        out[owner[g]].extend(items)
    return out


def by_group(n_groups: int, group_size: int, n_members: int) -> list[list[int]]:
    """Flat item indices per member with every group's ``group_size`` items on one member, the
    groups dealt in turn (per-image state such as a SAM embedding is then computed once)."""
    out: list[list[int]] = [[] for _ in range(n_members)]
    for g in range(n_groups):
        out[g % n_members].extend(range(g * group_size, (g + 1) * group_size))
    return out


def pack_micro_batches(
    groups: list[list[int]],
    prompt_tokens: list[int],
    answer_tokens: list[int],
    *,
    max_answers: int,
    max_tokens: int | None = None,
    shared: bool = True,
) -> list[list[int]]:
    """A rank's micro-batches: lists of item indices, in the groups' order.

    ``groups``: item indices per prompt group; ``prompt_tokens[g]``: group g's prompt length;
    ``answer_tokens[i]``: item i's. Without ``max_tokens``: ``max_answers`` items at a time.
    With it (``max_answers`` then unused): whole groups packed while the micro-batch's tokens stay within it, a group counting
    its prompt once (``shared``, the shared-prefix layout) or once per answer. A group larger than
    the budget is split into pieces of the prompt and some of its answers (each piece shares the
    prompt); a prompt and one answer that do not fit are refused, with the numbers."""
    if max_answers < 1:
        raise ValueError(f"max_answers must be >= 1, got {max_answers}")
    flat = [i for g in groups for i in g]
    if max_tokens is None:
        return [flat[k : k + max_answers] for k in range(0, len(flat), max_answers)]
    out: list[list[int]] = []
    cur: list[int] = []
    cur_tokens = 0
    for g, items in enumerate(groups):
        p = prompt_tokens[g]
        for i in items:
            one = p + answer_tokens[i]
            if one > max_tokens:
                raise ValueError(
                    f"learner.max_tokens_per_micro_batch {max_tokens} cannot hold one answer: its prompt has {p} "
                    f"tokens and the answer {answer_tokens[i]} ({one}); raise the budget or lower the pixel budget "
                    "or rollout.max_new_tokens"
                )
        # the group whole, or in pieces that each repeat the prompt
        pieces: list[list[int]] = []
        piece: list[int] = []
        t = p if shared else 0
        for i in items:
            add = answer_tokens[i] + (0 if shared else p)
            if piece and t + add > max_tokens:
                pieces.append(piece)
                piece, t = [], (p if shared else 0)
            piece.append(i)
            t += add
        pieces.append(piece)
        for piece in pieces:
            cost = sum(answer_tokens[i] for i in piece) + (p if shared else p * len(piece))
            if cur and cur_tokens + cost > max_tokens:
                out.append(cur)
                cur, cur_tokens = [], 0
            cur.extend(piece)
            cur_tokens += cost
    if cur:
        out.append(cur)
    return out


def micro_batch_plan(shard_sizes: list[int], micro_batch_size: int) -> int:
    """Micro-batches every rank runs in one update: enough for the largest shard, at least one.
    All ranks run the same number (ranks with less data run zero-weight micro-batches), because
    ZeRO-2 reduces gradients on every backward: unequal counts mismatch the collectives."""
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    return max(1, max((-(-s // micro_batch_size) for s in shard_sizes), default=1))
