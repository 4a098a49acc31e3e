"""The figures of one GRPO step, built in one place from the step's typed records (pure)."""

from __future__ import annotations

from collections import Counter

import torch

from rlsys.grpo.algorithm import group_reward_std
from rlsys.grpo.records import LearnerStats, ScoredGroup

# A group reward spread below this is noise in the IoU, not a better answer (groups/small_std_fraction).
SMALL_GROUP_STD = 0.02


def rewards_and_valid(scores: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards ``[B]`` and whether each was computed (False: the scorer failed twice)."""
    return (
        torch.tensor([s.reward for s in scores], dtype=torch.float32),
        torch.tensor([not s.failed for s in scores], dtype=torch.bool),
    )


def step_metrics(
    *,
    step: int,
    groups: list[ScoredGroup],
    tasks: list[str],
    group_size: int,
    drawn_groups: int,
    zero_std_groups: int,
    learn: LearnerStats,
    times: dict[str, float],
    engine_restarts: int,
    reward_worker_replacements: int,
    refused_requests: int,
    inflight_batches: int,
    bad_images: int = 0,
) -> dict:
    """The step's figures. ``tasks``: each group's sample task; ``drawn_groups`` /
    ``zero_std_groups``: groups drawn over the dynamic-sampling rounds and those among them whose
    rewards had no spread. Reward statistics are over the answers that were scored (a failed
    score is not a 0)."""
    all_scores = [s for g in groups for s in g.scores]
    flat = [s for s in all_scores if not s.failed] or all_scores
    n = max(len(flat), 1)
    rewards = torch.tensor([s.reward for s in flat], dtype=torch.float32)
    group_r, group_valid = rewards_and_valid(all_scores)
    std = group_reward_std(group_r, group_size, valid=group_valid)
    lens = [len(a.token_ids) for g in groups for a in g.answers]
    stale = Counter()
    for g in groups:
        stale[g.staleness] += len(g.answers)
    beh = learn.behaviour_tokens
    metrics = {
        "step": step,
        "reward/mean": float(rewards.mean()) if len(rewards) else 0.0,
        "reward/std": float(rewards.std()) if len(rewards) > 1 else 0.0,
        "reward/precision": sum(s.precision for s in flat) / n,
        "reward/recall": sum(s.recall for s in flat) / n,
        "reward/duplicate_rate": sum(bool(s.duplicate) for s in flat) / n,
        "reward/large_box_rate": sum(bool(s.large_box) for s in flat) / n,
        "reward/unreadable_per_answer": sum(s.unreadable for s in flat) / n,
        "reward/failures": sum(s.failed for s in all_scores),
        # which reward scored each answer (box_iou, point_in_mask, point_in_box_fallback, ...)
        **{f"reward/kind/{k}": c for k, c in sorted(Counter(s.kind for s in flat).items())},
        "groups/zero_std_fraction": zero_std_groups / max(drawn_groups, 1),
        # groups with a spread below 0.02 (IoU noise): with advantage_scaling group_std their
        # answers still get advantages of +-1, the size of a real difference
        "groups/small_std_fraction": float(((std > 0) & (std < SMALL_GROUP_STD)).float().mean()) if len(std) else 0.0,
        "groups/reward_std_mean": float(std.mean()) if len(std) else 0.0,
        "learner/grad_norm": learn.grad_norm,
        "learner/lr": learn.lr,
        "answer/length_tokens": sum(lens) / max(len(lens), 1),
        # The engine's and the learner's log-probs of the same sampled tokens, on answers made
        # by the learner's current weights, should agree; a growing gap means the learner
        # optimises another policy than the one that sampled (another image resolution, a
        # temperature mismatch; with top_p < 1 it also holds the nucleus renormalisation).
        "rollout/logprob_gap": learn.gap_sum / learn.gap_tokens if learn.gap_tokens else float("nan"),
        "rollout/engine_restarts": engine_restarts,
        # reward workers replaced since these groups started (a dead or stuck one, its answers retried)
        "reward/worker_replacements": reward_worker_replacements,
        "rollout/refused_requests": refused_requests,
        "rollout/bad_images": bad_images,  # of those, images that did not decode in a worker
        # how many learner versions behind the weights that made each answer were
        "rollout/staleness_mean": sum(k * c for k, c in stale.items()) / max(sum(stale.values()), 1),
        "rollout/staleness_max": max(stale) if stale else 0,
        **{f"rollout/staleness/{k}": c for k, c in sorted(stale.items())},
        "rollout/inflight_batches": inflight_batches,
        "learner/kl": learn.per_token("kl"),
        "learner/clip_fraction": learn.per_token("clip_fraction"),
        "learner/entropy": learn.per_token("entropy"),
        "learner/loss": learn.loss,
        "learner/answers": learn.answers,
        "learner/micro_batches_per_rank": learn.micro_batches,
        "learner/padded_micro_batches": learn.padded_micro_batches,
        "learner/encoded_prompts": learn.encoded_prompts,
        "learner/vision_tower_runs": learn.vision_tower_runs,
        # off-policy correction over the answers it applied to (exp(learner - engine) per token)
        "learner/corrected_tokens": beh,
        "learner/behaviour_ratio_mean": learn.behaviour_w_sum / beh if beh else 1.0,
        "learner/behaviour_ratio_max": learn.behaviour_w_max if beh else 1.0,
        "learner/behaviour_abs_log_ratio": learn.behaviour_abs_log_sum / beh if beh else 0.0,
        "learner/is_truncated_fraction": learn.behaviour_truncated / beh if beh else 0.0,
        "throughput/generated_tokens_per_s": sum(lens) / max(times.get("generate", 1e-9), 1e-9),
    }
    by_task: dict[str, list[float]] = {}
    for g, task in zip(groups, tasks):
        by_task.setdefault(task, []).extend(s.reward for s in g.scores)
    metrics.update({f"reward/{t}": sum(v) / len(v) for t, v in by_task.items()})
    metrics.update({f"time/{k}_s": v for k, v in times.items()})
    return metrics
