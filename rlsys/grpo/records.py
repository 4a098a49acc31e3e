"""What crosses the stages of one GRPO step, typed (pure: no Ray, vLLM or DeepSpeed).

rollout group -> ``list[Answer] | Refusal`` per prompt -> reward group -> ``Score`` per answer
-> controller -> ``ScoredGroup`` per prompt -> ``LearnerItem`` per answer learnt from -> learner
group -> ``LearnerStats`` per rank, merged into one by :meth:`LearnerStats.merge`. They are plain
dataclasses, so they pickle through Ray as they are.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any


@dataclass(frozen=True)
class Answer:
    """One sampled answer as the engine returned it."""

    text: str
    token_ids: list[int]  # the sampled tokens, never re-tokenised
    logprobs: list[float] | None = None  # the engine's (behaviour) log-prob of each sampled token
    prompt_ids: list[int] | None = None  # the prompt as the engine tokenised it (image tokens expanded)
    finish_reason: str | None = None  # "stop" or "length" (truncated)


@dataclass(frozen=True)
class Refusal:
    """A request the engine would not take (longer than its context, say), or whose image did
    not decode (``image_unreadable``): it fails alone."""

    reason: str
    image_unreadable: bool = False


@dataclass(frozen=True)
class Score:
    """The reward of one answer and its parts, as a reward worker computed it; ``failed``: the
    scorer raised twice (the answer is left out of its group's statistics, not scored 0)."""

    reward: float
    kind: str
    precision: float = 0.0
    recall: float = 0.0
    num_pred: int = 0
    num_gt: int = 0
    unreadable: int = 0
    duplicate: bool = False
    large_box: bool = False
    error: str | None = None
    failed: bool = False

    @classmethod
    def of(cls, result: Any) -> Score:
        """From a scorer's result (:class:`rewards.scorer.RewardResult` or any object with its
        fields); fields the scorer does not report keep their defaults."""
        names = {f.name for f in fields(cls)} - {"failed"}
        return cls(**{n: getattr(result, n) for n in names if hasattr(result, n)})

    @classmethod
    def failure(cls, error: str) -> Score:
        return cls(reward=0.0, kind="error", error=error, failed=True)


@dataclass(frozen=True)
class ScoredGroup:
    """One prompt's G answers and their scores. ``staleness``: learner updates between the
    weights that generated the answers and the weights they are learnt into."""

    idx: int  # the sample's index in the training set
    prompt: str  # the chat prompt as sent to the engine
    answers: list[Answer]
    scores: list[Score]
    staleness: int = 0


@dataclass(frozen=True)
class LearnerItem:
    """One answer to learn from: the prompt as the engine saw it, the sampled ids, the answer's
    group-normalised advantage; ``engine_logp`` are the behaviour log-probs, applied as an
    importance weight when ``correct``; ``ref_logp`` the frozen reference's (filled by the
    learner group's reference pass when the KL term is on)."""

    prompt: str
    image: str
    response_ids: list[int]
    advantage: float = 0.0
    prompt_ids: list[int] | None = None
    engine_logp: list[float] | None = None
    correct: bool = False
    ref_logp: Any = None  # a 1-D tensor [answer tokens]


@dataclass(frozen=True)
class LearnerStats:
    """One learner update's figures as sums, so ranks merge by adding (:meth:`merge`) and the
    means are taken once, over all ranks' tokens (a mean of per-rank means would weight a rank
    with few tokens like one with many)."""

    tokens: int = 0  # answer tokens learnt from (zero-weight padding excluded)
    answers: int = 0
    loss: float = 0.0  # the step's loss: micro-batch losses add up (global token normaliser)
    kl_sum: float = 0.0  # per-token KL to the reference, summed over tokens
    clip_sum: float = 0.0  # clipped tokens
    entropy_sum: float = 0.0
    micro_batches: int = 0  # per rank (the same on every rank)
    padded_micro_batches: int = 0  # zero-weight micro-batches run to keep the collectives aligned
    encoded_prompts: int = 0  # processor runs (once per prompt and image, not per answer)
    vision_tower_runs: int = 0  # freeze_vision: tower runs shared by both passes (once per image)
    gap_sum: float = 0.0  # |engine - learner| log-prob over on-policy tokens
    gap_tokens: int = 0
    behaviour_tokens: int = 0  # tokens under the off-policy correction
    behaviour_w_sum: float = 0.0  # their importance weights exp(learner - engine), summed
    behaviour_w_max: float = 0.0
    behaviour_abs_log_sum: float = 0.0
    behaviour_truncated: int = 0  # weights above learner.is_cap
    grad_norm: float = 0.0  # global (all ranks): rank 0's value
    lr: float = 0.0
    optimizer_steps: int = 0

    @classmethod
    def merge(cls, ranks: list[LearnerStats]) -> LearnerStats:
        """All ranks' figures as one update's: sums add; the per-rank or global ones (micro-batches,
        gradient norm, learning rate, optimizer steps) are rank 0's; the largest weight is the max."""
        if not ranks:
            raise ValueError("no learner ranks to merge")
        first = ranks[0]
        per_rank = {"micro_batches", "grad_norm", "lr", "optimizer_steps"}
        out = {}
        for f in fields(cls):
            vals = [getattr(r, f.name) for r in ranks]
            if f.name in per_rank:
                out[f.name] = getattr(first, f.name)
            elif f.name == "behaviour_w_max":
                out[f.name] = max(vals)
            else:
                out[f.name] = sum(vals)
        return cls(**out)

    def per_token(self, name: str) -> float:
        """``kl``, ``clip_fraction`` or ``entropy`` averaged over the update's tokens."""
        total = {"kl": self.kl_sum, "clip_fraction": self.clip_sum, "entropy": self.entropy_sum}[name]
        return total / self.tokens if self.tokens else 0.0
