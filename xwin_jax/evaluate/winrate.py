"""AlpacaEval's numbers from pairwise preferences: 1 = the reference (baseline) wins,
2 = the model wins, 1.5 = a draw.

    win rate        100 x mean(preference - 1)
    standard error  100 x SEM(preference - 1)   (sample std, ddof 1, over sqrt(n))
    length-controlled win rate
                    a logistic regression of (preference - 1) on tanh(standardised length
                    difference, model - reference); its prediction at zero difference, x 100
                    (AlpacaEval 2.0's GLM also has per-instruction difficulty terms; this
                    one-instruction-blind fit is its length part only, so numbers are close to,
                    not equal to, the official tool's)
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

LEADERBOARD_COLUMNS = ("win_rate", "standard_error", "n_wins", "n_wins_base", "n_draws",
                       "n_total", "avg_length", "length_controlled_winrate")


def win_rate(preferences: Sequence[float]) -> tuple[float, float]:
    """(win rate, standard error), both in percent."""
    y = np.asarray(preferences, np.float64) - 1.0
    if y.size == 0:
        raise ValueError("no preferences to summarise")
    if np.any((y < 0) | (y > 1)):
        raise ValueError("preferences must lie in [1, 2] (1 = reference wins, 2 = model wins)")
    sem = float(y.std(ddof=1) / np.sqrt(y.size)) if y.size > 1 else float("nan")
    return 100.0 * float(y.mean()), 100.0 * sem


def length_controlled_win_rate(preferences: Sequence[float], model_lengths: Sequence[float],
                               reference_lengths: Sequence[float], iterations: int = 100,
                               ridge: float = 1e-6) -> float:
    """Fits logit P(model wins) = a + b * tanh((len_m - len_r) / std) by Newton's method on
    the soft labels (draws count 0.5) and returns 100 * sigmoid(a)."""
    y = np.asarray(preferences, np.float64) - 1.0
    difference = np.asarray(model_lengths, np.float64) - np.asarray(reference_lengths,
                                                                    np.float64)
    scale = difference.std()
    x = np.tanh(difference / scale) if scale > 0 else np.zeros_like(difference)
    features = np.stack([np.ones_like(x), x], axis=1)
    weights = np.zeros(2)
    penalty = np.array([0.0, ridge])  # on the slope only: it keeps x = 0 (equal lengths) solvable
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-features @ weights))
        gradient = features.T @ (y - p) - penalty * weights
        hessian = (features * (p * (1 - p))[:, None]).T @ features + np.diag(penalty)
        step = np.linalg.solve(hessian, gradient)
        weights += step
        if np.max(np.abs(step)) < 1e-10:
            break
    return float(100.0 / (1.0 + np.exp(-weights[0])))


def leaderboard_row(preferences: Sequence[float], model_lengths: Sequence[float],
                    reference_lengths: Sequence[float]) -> dict:
    """One leaderboard row with AlpacaEval's columns."""
    preferences = np.asarray(preferences, np.float64)
    rate, error = win_rate(preferences)
    return {"win_rate": rate, "standard_error": error,
            "n_wins": int(np.sum(preferences > 1.5)),
            "n_wins_base": int(np.sum(preferences < 1.5)),
            "n_draws": int(np.sum(preferences == 1.5)),
            "n_total": int(preferences.size),
            "avg_length": float(np.mean(model_lengths)),
            "length_controlled_winrate": length_controlled_win_rate(
                preferences, model_lengths, reference_lengths)}
