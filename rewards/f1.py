"""The F1 aggregation shared by every reward (Rex-Omni paper, section 4.2.3, equations 3-4).

Each reward turns a similarity matrix ``sim[i, j]`` between prediction ``i`` and GT ``j`` (box
IoU, polygon IoU, OKS, or 0/1 for point-in-mask / point-in-box) into one score per GT,
``r_j``, then into precision ``sum(r) / num_pred``, recall ``sum(r) / num_gt`` and their F1.
Dividing by the number of *predictions* is what makes duplicates cost reward (the released
Rex-Omni code did not, see GUIDE.md section 5).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MATCHINGS = ("paper", "hungarian")


@dataclass(frozen=True)
class F1Result:
    """What every reward function returns.

    ``f1`` is the reward. ``matched`` is ``sum_j r_j`` (soft true positives), kept so a caller
    that adds predictions scoring 0 (wrong kind, unreadable) can recompute with
    :func:`f1_from_sum` without redoing the geometry.
    """

    f1: float
    precision: float
    recall: float
    num_pred: int
    num_gt: int
    matched: float

    def __float__(self) -> float:
        return self.f1


def f1_from_sum(matched: float, num_pred: int, num_gt: int) -> F1Result:
    """Equation 4: ``P = matched / num_pred``, ``R = matched / num_gt``, ``F1 = 2PR / (P + R)``.

    No GT and no prediction is a perfect answer (1.0: every phrase correctly answered ``None``);
    exactly one side empty scores 0. The paper's ``+ eps`` in the denominator only guards 0/0;
    we branch instead, so that a perfect answer scores exactly 1.0.

    ``P`` is clipped at 1: under equation 3 one prediction may be the best match of several
    overlapping GT, and ``sum(r) / num_pred`` would then exceed 1 (one box on two identical
    GT boxes gives P = 2, F1 = 4/3). Recall never needs it (``r_j <= 1``).
    """
    if num_pred == 0 and num_gt == 0:
        return F1Result(1.0, 1.0, 1.0, 0, 0, 0.0)
    p = min(matched / num_pred, 1.0) if num_pred else 0.0
    r = matched / num_gt if num_gt else 0.0
    f1 = 2.0 * p * r / (p + r) if p + r > 0 else 0.0
    return F1Result(float(f1), float(p), float(r), int(num_pred), int(num_gt), float(matched))


def f_beta(precision: float, recall: float, beta: float) -> float:
    """``(1 + b^2) P R / (b^2 P + R)``: recall weighted ``beta`` times as much as precision
    (``beta = 1`` is F1); 0 when both are 0."""
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    b2 = beta * beta
    den = b2 * precision + recall
    return (1.0 + b2) * precision * recall / den if den > 0 else 0.0


def gt_scores(sim: np.ndarray, same: np.ndarray, matching: str = "paper") -> np.ndarray:
    """Per-GT rewards ``r_j`` ``[M]`` from ``sim`` ``[N, M]`` (>= 0) and label agreement ``same``.

    ``"paper"`` (equation 3): GT ``j`` takes the prediction of largest similarity among *all*
    predictions; ``r_j`` is that similarity if its label matches, else 0. Ties go to a
    prediction with the right label (so for 0/1 similarities this is equation 5's "there is a
    same-label point inside"). Several GT may take the same prediction: the duplicate penalty
    comes only from dividing by ``num_pred``.

    ``"hungarian"``: one-to-one assignment maximising ``sum sim * same``
    (``scipy.optimize.linear_sum_assignment``); each prediction serves at most one GT, which
    is stricter on duplicates and on one box covering two objects.
    """
    if matching not in MATCHINGS:
        raise ValueError(f"matching must be one of {MATCHINGS}, got {matching!r}")
    n, m = sim.shape
    if n == 0 or m == 0:
        return np.zeros(m)
    if matching == "paper":
        best_all = sim.max(axis=0)
        best_same = np.where(same, sim, -np.inf).max(axis=0)
        return np.where(best_same >= best_all, best_same, 0.0)
    from scipy.optimize import linear_sum_assignment

    w = np.where(same, sim, 0.0)
    rows, cols = linear_sum_assignment(w, maximize=True)
    r = np.zeros(m)
    r[cols] = w[rows, cols]
    return r


def f1_from_matrix(sim: np.ndarray, same: np.ndarray, matching: str = "paper") -> F1Result:
    """:func:`gt_scores` then :func:`f1_from_sum` over ``N`` predictions and ``M`` GT."""
    r = gt_scores(sim, same, matching)
    return f1_from_sum(float(r.sum()), sim.shape[0], sim.shape[1])
