"""AlpacaEval's numbers from pairwise preferences: 1 = the reference (baseline) wins,
2 = the model wins, 1.5 = a draw; None/NaN = unjudged (the judge gave no usable verdict).

Unjudged preferences are left out of every number (as alpaca_eval's `get_winrate` drops
preferences that are NaN: "drop N outputs that are not preferences") and counted in
`n_unjudged`; `n_total` is the number of judged instructions (draws included).

    win rate        100 x mean(preference - 1)
    standard error  100 x SEM(preference - 1)   (sample std, ddof 1, over sqrt(n); NaN at
                    n = 1, as pandas' .sem() and alpaca_eval give)
    length-controlled win rate
                    a logistic regression of (preference - 1) (soft labels: a draw is 0.5) on
                    an intercept and x = tanh(standardised length difference, model -
                    reference; std with ddof 1 as pandas), with a ridge penalty
                    `ridge` * b^2 / 2 on the slope b only (a standard normal prior on the
                    length effect of a feature in (-1, 1)); LC = 100 x sigmoid(intercept),
                    the prediction at zero length difference.
                    (AlpacaEval 2.0's GLM also has per-instruction difficulty terms and
                    regularises with "gamed" baselines and a cross-validated L1 penalty; this
                    fit is its length part only, so numbers are close to, not equal to, the
                    official tool's.)

The length-controlled fit is defined for every input:

- every judged preference the same — all model wins, all reference wins, all draws, and
  n = 1: LC = the raw win rate (100, 0 or 50). For all wins or all losses this is the limit
  of the fit (the intercept goes to +-infinity; there is nothing for the length term to
  explain); for all draws the fit gives 50 exactly.
- no variance in the length differences (identical lengths, or one instruction): x = 0, the
  fit is intercept-only and LC = the raw win rate exactly.
- otherwise the ridge keeps the slope finite, so the fit exists even when the longer answer
  always wins (perfect separation: the unpenalised maximum likelihood has none, and the old
  near-unpenalised fit drifted towards LC 0 or 100 — 97.5 for the example below). At tiny n
  the slope stays small and LC near the raw win rate: two pairs where the longer answer won
  (model +10 characters and won, -30 and lost) give LC 52.7 with a raw win rate of 50 (the
  same as scikit-learn's L2 LogisticRegression with C = 1 / ridge). At AlpacaEval's n = 805
  the penalty is small against the data (its curvature is ~n var(x) p(1-p), tens to
  hundreds) and the fit is near the maximum likelihood.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

LEADERBOARD_COLUMNS = ("win_rate", "standard_error", "n_wins", "n_wins_base", "n_draws",
                       "n_total", "avg_length", "length_controlled_winrate")
SLOPE_RIDGE = 1.0


def judged_mask(preferences: Sequence[float | None]) -> np.ndarray:
    """True where a preference was judged (not None/NaN)."""
    return np.array([p is not None and not math.isnan(float(p)) for p in preferences], bool)


def _labels(preferences: Sequence[float | None]) -> np.ndarray:
    """preference - 1 for the judged preferences, checked to lie in [0, 1]."""
    mask = judged_mask(preferences)
    y = np.array([float(p) for p, m in zip(preferences, mask) if m], np.float64) - 1.0
    if y.size == 0:
        raise ValueError("no judged preferences to summarise")
    if np.any((y < 0) | (y > 1)):
        raise ValueError("preferences must lie in [1, 2] (1 = reference wins, 2 = model wins)")
    return y


def win_rate(preferences: Sequence[float | None]) -> tuple[float, float]:
    """(win rate, standard error), both in percent, over the judged preferences."""
    y = _labels(preferences)
    sem = float(y.std(ddof=1) / np.sqrt(y.size)) if y.size > 1 else float("nan")
    return 100.0 * float(y.mean()), 100.0 * sem


def _penalised_loglik(weights: np.ndarray, features: np.ndarray, y: np.ndarray,
                      ridge: float) -> float:
    eta = features @ weights
    return float(np.sum(y * eta - np.logaddexp(0.0, eta)) - 0.5 * ridge * weights[1] ** 2)


def length_controlled_win_rate(preferences: Sequence[float | None],
                               model_lengths: Sequence[float],
                               reference_lengths: Sequence[float], *,
                               ridge: float = SLOPE_RIDGE, iterations: int = 100) -> float:
    """100 * sigmoid(a) for the fit logit P(model wins) = a + b * x, x = tanh((len_m - len_r)
    / std), maximising the soft-label log-likelihood minus ridge * b^2 / 2 (damped Newton).
    Unjudged preferences (None/NaN) and their lengths are left out. Defined for every
    input with at least one judged preference (see the module docstring)."""
    mask = judged_mask(preferences)
    y = _labels(preferences)
    difference = (np.asarray(model_lengths, np.float64)
                  - np.asarray(reference_lengths, np.float64))[mask]
    if np.all(y == y[0]):
        return 100.0 * float(y[0])  # all the same: the fit's limit is the raw win rate
    scale = difference.std(ddof=1) if difference.size > 1 else 0.0
    if not scale > 0:
        return 100.0 * float(y.mean())  # x = 0: the intercept-only fit, exactly
    x = np.tanh(difference / scale)
    features = np.stack([np.ones_like(x), x], axis=1)
    penalty = np.array([0.0, ridge])
    weights = np.zeros(2)
    objective = _penalised_loglik(weights, features, y, ridge)
    for _ in range(iterations):
        p = np.exp(-np.logaddexp(0.0, -(features @ weights)))  # sigmoid, overflow-free
        gradient = features.T @ (y - p) - penalty * weights
        hessian = (features * (p * (1 - p))[:, None]).T @ features + np.diag(penalty)
        step = np.linalg.solve(hessian + 1e-12 * np.eye(2), gradient)
        scale_step = 1.0  # halve until the objective does not fall (concave: always ends)
        while scale_step > 1e-8:
            candidate = weights + scale_step * step
            value = _penalised_loglik(candidate, features, y, ridge)
            if value >= objective - 1e-12:
                break
            scale_step /= 2
        weights, objective = candidate, value
        if np.max(np.abs(scale_step * step)) < 1e-10:
            break
    return float(100.0 * np.exp(-np.logaddexp(0.0, -weights[0])))


def leaderboard_row(preferences: Sequence[float | None], model_lengths: Sequence[float],
                    reference_lengths: Sequence[float]) -> dict:
    """One leaderboard row: AlpacaEval's columns over the judged preferences, plus
    `n_unjudged`. `avg_length` is the model's mean output length over every instruction
    (alpaca_eval computes it over all model outputs). ValueError when nothing was judged."""
    rate, error = win_rate(preferences)
    judged = _labels(preferences) + 1.0
    return {"win_rate": rate, "standard_error": error,
            "n_wins": int(np.sum(judged > 1.5)),
            "n_wins_base": int(np.sum(judged < 1.5)),
            "n_draws": int(np.sum(judged == 1.5)),
            "n_total": int(judged.size),
            "avg_length": float(np.mean(model_lengths)),
            "length_controlled_winrate": length_controlled_win_rate(
                preferences, model_lengths, reference_lengths),
            "n_unjudged": len(preferences) - judged.size}
