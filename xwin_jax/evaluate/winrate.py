"""AlpacaEval's numbers from pairwise preferences: 1 = the reference (baseline) wins,
2 = the model wins, 1.5 = a draw; None/NaN = unjudged (the judge gave no usable verdict).

Unjudged preferences are left out of every number (as alpaca_eval's `get_winrate` drops
preferences that are NaN: "drop N outputs that are not preferences") and counted in
`n_unjudged`; `n_total` is the number of judged instructions (draws included). The one
exception is alpaca_eval's own: AlpacaEval 2.0's LC fits the judged ones only but averages
its prediction over every instruction.

    win rate        100 x mean(preference - 1)
    standard error  100 x SEM(preference - 1)   (sample std, ddof 1, over sqrt(n); NaN at
                    n = 1, as pandas' .sem() and alpaca_eval give)
    length-controlled win rate (`length_controlled_winrate`), in one of three variants,
    named in the row's `length_controlled_variant`:

"alpaca_eval_2.0" — AlpacaEval 2.0's own number, exactly as alpaca_eval 0.6.6 computes it
(metrics/glm_winrate.py, get_length_controlled_winrate, glm "length_controlled_v1"), given
the file it downloads from the Hugging Face dataset tatsu-lab/alpaca_eval, df_gamed.csv
(read_instruction_difficulty; columns model, index, preference, std_delta_len,
instruction_difficulty, not_gamed_baseline: the annotations of two length-gamed baselines,
gpt4_1106_preview made verbose and concise, and each instruction's difficulty):

- the GLM  logit P(model wins) = w_l tanh(std_delta_len) + w_d instruction_difficulty
  + w_m not_gamed_baseline, no intercept; std_delta_len = (len(reference) - len(model)) /
  its std (ddof 1, over every instruction, unjudged ones too), instruction_difficulty by the
  instruction's AlpacaEval index: alpaca_eval looks it up by its annotations' row index,
  which is the instruction's position in the reference outputs (its merge keeps their
  order), so evaluate/pairwise.py passes the position in REFERENCE_OUTPUTS (AlpacaEval's
  reference, in its order); an index the file lacks is a DataFormatError naming how many
  and which (alpaca_eval raises a KeyError); not_gamed_baseline = 1 for the model's rows, 0
  for the gamed rows;
- fitted on the judged preferences - 1 (soft labels: a draw is 0.5, a weighted judge's
  continuous preference stays as it is) after the gamed rows, which weigh
  regularize_to_baseline_lambda / 2 = 0.1 each (the model's rows 1): alpaca_eval duplicates
  each row as label 1 with weight s*p and label 0 with weight s*(1-p), the soft-label
  likelihood exactly;
- L1-penalised (scikit-learn LogisticRegressionCV: liblinear, penalty "l1",
  fit_intercept=False), the strength chosen among Cs = logspace(-4, 4, 10) by 5-fold
  GroupKFold cross-validation (both copies of a row in one fold; folds assigned round robin
  from the last row, as scikit-learn 1.9's GroupKFold does with equal groups), scored by
  minus the mean over the fold's rows of weight x soft-label log loss (predictions clipped
  to 1e-15), best sum over folds (first on ties), refitted on all rows;
- LC = 100 x mean over every instruction (unjudged ones too: the prediction needs only the
  difficulty) of sigmoid(w_d instruction_difficulty + w_m), the prediction at
  std_delta_len = 0.

The fit is solved here to convergence with numpy (proximal Newton with coordinate descent,
l1_logistic_regression), never importing scikit-learn or alpaca_eval, which stop at
liblinear's tol = 1e-4. Measured against alpaca_eval 0.6.6 + scikit-learn 1.9.1 on the same
annotations and a synthetic df_gamed.csv of 2 x 805 rows (tests/test_lc_alpaca_eval.py):
within 4.2e-4 LC points at n = 30, 200 and 805 and with draws and unjudged rows, 2.4e-3
with continuous preferences and with one length difference everywhere, 0.025 with every
preference a win (where liblinear's early stop leaves the most); with liblinear run to
tol = 1e-10, within 1.1e-6 everywhere.

"alpaca_eval_2.0_noreg" — the same GLM without the gamed rows (alpaca_eval's
"length_controlled_noreg"), when the file given is instruction_difficulty.csv (index,
instruction_difficulty), the difficulty alone. Fewer than 5 judged preferences (where
scikit-learn's 5-fold split fails) are fitted at C = 100, fit_LogisticRegressionCV's C
without cross-validation.

"length_only" (no difficulty file) — a logistic regression of (preference - 1) (soft
labels) on an intercept and x = tanh(standardised length difference, model - reference;
std with ddof 1 as pandas), with a ridge penalty `ridge` * b^2 / 2 on the slope b only (a
standard normal prior on the length effect of a feature in (-1, 1)); LC = 100 x
sigmoid(intercept), the prediction at zero length difference. Without the difficulty terms
and the gamed baselines it is close to, not equal to, the official number (on the test's
synthetic sets: 5.3 points apart at n = 30, 0.4 at n = 200, 0.6 at n = 805). Unjudged
preferences are left out of it entirely.

AlpacaEval 2.0's GLM is defined wherever alpaca_eval's is (an identical non-zero length
difference everywhere: std 0, tanh(+-inf) = +-1, as alpaca_eval). Where alpaca_eval fails
because std_delta_len is not a number (identical lengths everywhere: 0 / 0; one
instruction: no std; patsy then drops those rows and pandas raises) the length feature of
the model's rows is 0 — what alpaca_eval gives with np.nan_to_num(std_delta_len) in its
formula. So every input with a judged preference has a value; all wins and all losses stay
finite (the L1 penalty bounds the weights).

The length-only fit is defined for every input:

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

import csv
import dataclasses
import math
from typing import Sequence

import numpy as np

from xwin_jax.data.formats import DataFormatError

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


def _sigmoid(x: np.ndarray) -> np.ndarray:
    """The logistic function, overflow-free."""
    return np.exp(-np.logaddexp(0.0, -x))


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
        p = _sigmoid(features @ weights)
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
    return float(100.0 * _sigmoid(weights[0]))


# --- AlpacaEval 2.0's GLM: alpaca_eval 0.6.6, metrics/glm_winrate.py, length_controlled_v1 ----

GLM_CS = np.logspace(-4, 4, 10)  # LogisticRegressionCV's grid (Cs=10)
GLM_FOLDS = 5                    # GLM_INFO[...]["kwargs"]["n_splits"]
GAMED_BASELINE_LAMBDA = 0.2      # regularize_to_baseline_lambda, split over the 2 gamed baselines
NO_CV_C = 100.0                  # fit_LogisticRegressionCV's C when it does not cross-validate
LOG_LOSS_CLIP = 1e-15            # glm_winrate.logloss's epsilon
VARIANT_LENGTH_ONLY = "length_only"
VARIANT_ALPACA_EVAL = "alpaca_eval_2.0"              # length_controlled_v1, from df_gamed.csv
VARIANT_ALPACA_EVAL_NOREG = "alpaca_eval_2.0_noreg"  # length_controlled_noreg
_GAMED_COLUMNS = ("index", "preference", "std_delta_len", "instruction_difficulty",
                  "not_gamed_baseline")


@dataclasses.dataclass(frozen=True)
class InstructionDifficulty:
    """AlpacaEval's per-instruction difficulty by AlpacaEval index (an instruction's
    position in its reference outputs), and — read from df_gamed.csv — the rows of the two
    gamed baselines (features tanh(std_delta_len), instruction_difficulty,
    not_gamed_baseline; preference in [0, 1]; weight), which pull the fit towards them.
    From instruction_difficulty.csv: no gamed rows."""
    path: str
    difficulty: dict[int, float]
    gamed_features: np.ndarray | None = None
    gamed_preferences: np.ndarray | None = None
    gamed_weights: np.ndarray | None = None

    @property
    def variant(self) -> str:
        return VARIANT_ALPACA_EVAL if self.gamed_features is not None \
            else VARIANT_ALPACA_EVAL_NOREG

    def for_instructions(self, indices: Sequence[int]) -> np.ndarray:
        """The difficulty of the instructions at these AlpacaEval indices (alpaca_eval's
        annotations' row index: the position in its reference outputs); an error naming the
        missing ones."""
        missing = [i for i in indices if i not in self.difficulty]
        if missing:
            shown = ", ".join(map(str, missing[:10])) + (", ..." if len(missing) > 10 else "")
            raise DataFormatError(
                f"{self.path}: no instruction_difficulty for {len(missing)} of the "
                f"{len(indices)} instructions evaluated (index {shown}; the file has "
                f"{len(self.difficulty)}) — an instruction's index is its position in the "
                f"reference outputs, as in alpaca_eval: they must be AlpacaEval's, in its order")
        return np.array([self.difficulty[i] for i in indices], np.float64)


def _csv_number(value: str | None, where: str, field: str, *, empty_ok: bool = False
                ) -> float:
    if value is None:  # a short row: csv.DictReader fills the missing columns with None
        raise DataFormatError(f"{where}: field {field!r}: missing")
    if empty_ok and value.strip() in ("", "nan", "NaN"):
        return float("nan")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise DataFormatError(f"{where}: field {field!r}: expected a number, got {value!r}"
                              ) from None
    if not math.isfinite(number) and not empty_ok:
        raise DataFormatError(f"{where}: field {field!r}: expected a finite number")
    return number


def _csv_index(value: str | None, where: str, field: str) -> int:
    number = _csv_number(value, where, field)
    if number != int(number) or number < 0:
        raise DataFormatError(f"{where}: field {field!r}: expected an index >= 0, got {value!r}")
    return int(number)


def _csv_bool(value: str | None, where: str, field: str) -> bool:
    truth = {"true": True, "1": True, "1.0": True, "false": False, "0": False, "0.0": False}
    if value is None or value.strip().lower() not in truth:
        raise DataFormatError(f"{where}: field {field!r}: expected True or False, got {value!r}")
    return truth[value.strip().lower()]


def read_instruction_difficulty(path: str) -> InstructionDifficulty:
    """The difficulty file AlpacaEval distributes in its Hugging Face dataset
    tatsu-lab/alpaca_eval: df_gamed.csv (what get_length_controlled_winrate reads: columns
    model, index, preference, std_delta_len, instruction_difficulty, not_gamed_baseline — the
    gamed baselines' annotations; the difficulty of an index is its first row's) or
    instruction_difficulty.csv (index, instruction_difficulty). Other columns are ignored;
    bad values are a DataFormatError naming file:line and the column."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            columns = reader.fieldnames or []
            rows = [(reader.line_num, row) for row in reader]
    except OSError as err:
        raise DataFormatError(f"{path}: cannot read: {err.strerror or err}") from None
    except (UnicodeDecodeError, csv.Error) as err:
        raise DataFormatError(f"{path}: not a CSV file: {err}") from None
    if "instruction_difficulty" not in columns or len(columns) < 2:
        raise DataFormatError(
            f"{path}: expected AlpacaEval's df_gamed.csv (columns {', '.join(_GAMED_COLUMNS)}) "
            f"or instruction_difficulty.csv (index, instruction_difficulty); the columns are "
            f"{columns}")
    if not rows:
        raise DataFormatError(f"{path}: no rows")
    gamed = all(c in columns for c in _GAMED_COLUMNS)
    index_column = "index" if gamed else columns[0]  # pandas' index_col=0
    difficulty: dict[int, float] = {}
    features, preferences, weights = [], [], []
    for line, row in rows:
        where = f"{path}:{line}"
        index = _csv_index(row[index_column], where, index_column)
        value = _csv_number(row["instruction_difficulty"], where, "instruction_difficulty")
        if index in difficulty and not gamed:
            raise DataFormatError(f"{where}: index {index} appears twice")
        difficulty.setdefault(index, value)  # drop_duplicates("index"): the first row's
        if gamed:
            preference = _csv_number(row["preference"], where, "preference", empty_ok=True)
            if math.isnan(preference):
                continue  # alpaca_eval leaves rows without a preference out of the fit
            if not 0 <= preference <= 1:
                raise DataFormatError(f"{where}: field 'preference': expected a value in "
                                      f"[0, 1] (df_gamed.csv's scale), got {preference}")
            not_gamed = _csv_bool(row["not_gamed_baseline"], where, "not_gamed_baseline")
            features.append((np.tanh(_csv_number(row["std_delta_len"], where,
                                                 "std_delta_len")), value, float(not_gamed)))
            preferences.append(preference)
            weights.append(1.0 if not_gamed else GAMED_BASELINE_LAMBDA / 2)
    if not gamed:
        return InstructionDifficulty(path, difficulty)
    return InstructionDifficulty(path, difficulty, np.array(features, np.float64).reshape(-1, 3),
                                 np.array(preferences, np.float64), np.array(weights, np.float64))


def _l1_objective(w: np.ndarray, x: np.ndarray, p: np.ndarray, s: np.ndarray, c: float
                  ) -> float:
    eta = x @ w
    return c * float(np.sum(s * (np.logaddexp(0.0, eta) - p * eta))) + float(np.abs(w).sum())


def _l1_quadratic_step(g: np.ndarray, h: np.ndarray, w: np.ndarray, sweeps: int = 500
                       ) -> np.ndarray:
    """The d minimising g.d + d.h.d / 2 + |w + d|_1, by cyclic coordinate descent; the
    soft-threshold leaves a coordinate the L1 term pins at zero at exactly zero (as
    liblinear's), so fits that are all zero tie exactly, as in scikit-learn."""
    d = np.zeros_like(w)
    for _ in range(sweeps):
        largest = 0.0
        for j in range(w.size):
            z = w[j] + d[j] - (g[j] + h[j] @ d) / h[j, j]
            z = math.copysign(max(abs(z) - 1.0 / h[j, j], 0.0), z)
            largest = max(largest, abs(z - w[j] - d[j]))
            d[j] = z - w[j]
        if largest <= 1e-15 * (1.0 + float(np.abs(w + d).max())):
            break
    return d


def l1_logistic_regression(x: np.ndarray, p: np.ndarray, s: np.ndarray, c: float, *,
                           iterations: int = 200) -> np.ndarray:
    """argmin_w |w|_1 + c * sum_i s_i * logloss(p_i, sigmoid(x_i . w)), no intercept: what
    liblinear's L1-regularised logistic regression (solver="liblinear", penalty="l1") fits on
    alpaca_eval's duplicated rows (label 1 with weight s p, label 0 with weight s (1 - p)),
    solved to convergence (proximal Newton, the newGLMNET scheme, with Armijo steps) where
    liblinear stops at tol = 1e-4."""
    w = np.zeros(x.shape[1])
    value = _l1_objective(w, x, p, s, c)
    for _ in range(iterations):
        q = _sigmoid(x @ w)
        g = c * (x.T @ (s * (q - p)))
        h = c * ((x * (s * q * (1.0 - q))[:, None]).T @ x) + 1e-12 * np.eye(w.size)
        d = _l1_quadratic_step(g, h, w)
        decrease = float(g @ d + np.abs(w + d).sum() - np.abs(w).sum())
        if not decrease < -1e-13 * (1.0 + abs(value)):
            break  # w solves its own subproblem: optimal
        step = 1.0
        while step > 1e-12:
            candidate = _l1_objective(w + step * d, x, p, s, c)
            if candidate <= value + 0.01 * step * decrease:
                break
            step /= 2
        else:
            break
        w, value = w + step * d, candidate
    return w


def group_k_folds(n_rows: int, n_splits: int = GLM_FOLDS) -> np.ndarray:
    """The fold of each row under scikit-learn's GroupKFold (1.9, shuffle=False) with one
    group per row (alpaca_eval's two duplicates of a row share a group): groups sorted
    stably by size, all equal, reversed, each given to the emptiest fold (the first on
    ties) — round robin from the last row."""
    return (n_rows - 1 - np.arange(n_rows)) % n_splits


def cross_validated_l1_fit(x: np.ndarray, p: np.ndarray, s: np.ndarray, *,
                           cs: np.ndarray = GLM_CS, n_splits: int = GLM_FOLDS
                           ) -> tuple[np.ndarray, float]:
    """(weights, C) as alpaca_eval's fit_LogisticRegressionCV: for each C of `cs`, the L1 fit
    on 4 folds scored by minus the weighted soft-label log loss on the fifth (mean over its
    rows of s * logloss, predictions clipped to 1e-15); the C with the best sum over folds
    (the first on ties), refitted on every row. Fewer rows than folds: C = 100, as
    alpaca_eval without cross-validation (scikit-learn's GroupKFold refuses them)."""
    if len(p) < n_splits:
        return l1_logistic_regression(x, p, s, NO_CV_C), NO_CV_C
    folds = group_k_folds(len(p), n_splits)
    scores = np.zeros(len(cs))
    for fold in range(n_splits):
        train, test = folds != fold, folds == fold
        for i, c in enumerate(cs):
            w = l1_logistic_regression(x[train], p[train], s[train], float(c))
            q = np.clip(_sigmoid(x[test] @ w), LOG_LOSS_CLIP, 1 - LOG_LOSS_CLIP)
            scores[i] -= float(np.mean(s[test] * -(p[test] * np.log(q)
                                                    + (1 - p[test]) * np.log(1 - q))))
    best = float(cs[int(np.argmax(scores))])
    return l1_logistic_regression(x, p, s, best), best


def standardised_length_feature(difference: np.ndarray) -> np.ndarray:
    """tanh(difference / std(difference, ddof 1)), alpaca_eval's np.tanh(std_delta_len).
    With std 0 (every difference equal) it is sign(difference): alpaca_eval's tanh(+-inf)
    for a non-zero difference, and 0 for identical lengths and for one instruction (no
    std), where alpaca_eval's NaN makes it fail."""
    if difference.size < 2:
        return np.zeros_like(difference)
    scale = difference.std(ddof=1)
    return np.tanh(difference / scale) if scale > 0 else np.sign(difference)


def alpaca_eval_length_controlled_win_rate(preferences: Sequence[float | None],
                                           model_lengths: Sequence[float],
                                           reference_lengths: Sequence[float],
                                           difficulty: InstructionDifficulty,
                                           indices: Sequence[int] | None = None) -> float:
    """AlpacaEval 2.0's length-controlled win rate (see the module docstring): the GLM
    tanh(std_delta_len) + instruction_difficulty + not_gamed_baseline, no intercept, fitted
    by cross_validated_l1_fit on the judged preferences (and df_gamed.csv's rows), then 100 x
    the mean over every instruction of its prediction at std_delta_len = 0. `indices`: each
    instruction's AlpacaEval index (default 0, 1, ...: alpaca_eval's row positions)."""
    mask = judged_mask(preferences)
    y = _labels(preferences)
    n = len(preferences)
    instruction_difficulty = difficulty.for_instructions(
        range(n) if indices is None else list(indices))
    # std_delta_len is output_1 - output_2, reference - model, standardised over every row.
    length = standardised_length_feature(np.asarray(reference_lengths, np.float64)
                                         - np.asarray(model_lengths, np.float64))
    features = np.stack([length, instruction_difficulty, np.ones(n)], axis=1)
    x, p, s = features[mask], y, np.ones(y.size)
    if difficulty.gamed_features is not None:  # df_gamed.csv's rows come first, as alpaca_eval
        x = np.concatenate([difficulty.gamed_features, x])
        p = np.concatenate([difficulty.gamed_preferences, p])
        s = np.concatenate([difficulty.gamed_weights, s])
    weights, _ = cross_validated_l1_fit(x, p, s)
    at_equal_length = np.stack([np.zeros(n), instruction_difficulty, np.ones(n)], axis=1)
    return 100.0 * float(np.mean(_sigmoid(at_equal_length @ weights)))


def leaderboard_row(preferences: Sequence[float | None], model_lengths: Sequence[float],
                    reference_lengths: Sequence[float],
                    difficulty: InstructionDifficulty | None = None,
                    indices: Sequence[int] | None = None) -> dict:
    """One leaderboard row: AlpacaEval's columns over the judged preferences, plus
    `n_unjudged` and `length_controlled_variant` (which LC was computed: AlpacaEval 2.0's
    GLM with `difficulty`, the instructions at AlpacaEval `indices`, else the length-only
    fit). `avg_length` is the model's mean output length over every instruction
    (alpaca_eval computes it over all model outputs). ValueError when nothing was judged."""
    rate, error = win_rate(preferences)
    judged = _labels(preferences) + 1.0
    if difficulty is None:
        lc = length_controlled_win_rate(preferences, model_lengths, reference_lengths)
    else:
        lc = alpaca_eval_length_controlled_win_rate(preferences, model_lengths,
                                                    reference_lengths, difficulty, indices)
    return {"win_rate": rate, "standard_error": error,
            "n_wins": int(np.sum(judged > 1.5)),
            "n_wins_base": int(np.sum(judged < 1.5)),
            "n_draws": int(np.sum(judged == 1.5)),
            "n_total": int(judged.size),
            "avg_length": float(np.mean(model_lengths)),
            "length_controlled_winrate": lc,
            "n_unjudged": len(preferences) - judged.size,
            "length_controlled_variant": VARIANT_LENGTH_ONLY if difficulty is None
            else difficulty.variant}
