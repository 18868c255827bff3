"""AlpacaEval 2.0's length-controlled win rate against alpaca_eval 0.6.6's own code
(metrics/glm_winrate.py: get_length_controlled_winrate) on the same annotations.

alpaca_eval downloads df_gamed.csv (the gamed baselines' annotations and each instruction's
difficulty) from the Hugging Face hub; here its download is pointed at a synthetic file of
the same format (2 gamed baselines x 805 instructions), so the test runs offline. alpaca_eval
and scikit-learn are test-only: xwin_jax.evaluate.winrate imports neither."""

import math
import warnings

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("alpaca_eval")
with warnings.catch_warnings():  # alpaca_eval imports pkg_resources
    warnings.simplefilter("ignore")
    from alpaca_eval.metrics import glm_winrate
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.model_selection import GroupKFold  # noqa: E402

from xwin_jax.evaluate import winrate  # noqa: E402

N_INSTRUCTIONS = 805


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """(df_gamed.csv, instruction_difficulty.csv, the difficulties): df_gamed.csv's columns
    as alpaca_eval reads them (model, index, preference in [0, 1], std_delta_len,
    instruction_difficulty, not_gamed_baseline), a verbose and a concise baseline."""
    rng = np.random.default_rng(0)
    difficulty = rng.normal(0, 1.2, N_INSTRUCTIONS)
    frames = []
    for model, shift in (("gpt4_1106_preview_verbose", 0.8), ("gpt4_1106_preview_concise", -1)):
        std_delta_len = rng.normal(shift, 1.0, N_INSTRUCTIONS)
        p = 1 / (1 + np.exp(1.2 * np.tanh(std_delta_len) - 0.8 * difficulty))
        frames.append(pd.DataFrame({
            "model": model, "index": np.arange(N_INSTRUCTIONS),
            "preference": np.clip(p + rng.normal(0, 0.05, N_INSTRUCTIONS), 0, 1),
            "std_delta_len": std_delta_len, "instruction_difficulty": difficulty,
            "not_gamed_baseline": False}))
    directory = tmp_path_factory.mktemp("alpaca_eval")
    gamed, alone = str(directory / "df_gamed.csv"), str(directory / "instruction_difficulty.csv")
    pd.concat(frames).to_csv(gamed, index=False)
    pd.Series(difficulty, name="instruction_difficulty").rename_axis("index").to_csv(alone)
    return gamed, alone, difficulty


def annotations(difficulty, n, *, seed=1, draws=0.1, unjudged=0.0, continuous=False):
    """alpaca_eval's annotations (output_1 = the reference, preference 2 = the model wins)
    for instructions 0..n-1, wins drawn from a GLM with a length effect."""
    rng = np.random.default_rng(seed)
    reference = rng.integers(200, 2000, n)
    model = np.maximum(1, reference + rng.normal(150, 500, n).astype(int))
    p = 1 / (1 + np.exp(-(0.3 + 0.8 * difficulty[:n]
                          - 0.9 * np.tanh((reference - model) / 500))))
    preference = 1 + p if continuous else np.where(rng.random(n) < p, 2.0, 1.0)
    preference = np.where(rng.random(n) < draws, 1.5, preference) if not continuous \
        else preference
    preference = np.where(rng.random(n) < unjudged, np.nan, preference)
    return frame(preference, reference, model)


def frame(preference, reference_lengths, model_lengths):
    n = len(preference)
    return pd.DataFrame({"instruction": [f"instruction {i}" for i in range(n)],
                         "output_1": ["r" * int(k) for k in reference_lengths],
                         "output_2": ["m" * int(k) for k in model_lengths],
                         "generator_1": "reference", "generator_2": "model",
                         "preference": np.asarray(preference, float)})


def official(df, path, monkeypatch, glm_name="length_controlled_v1", tol=None, formula=None):
    """alpaca_eval's number, its download replaced by `path`; `tol`: liblinear's tolerance
    (alpaca_eval leaves scikit-learn's 1e-4), `formula`: another GLM formula."""
    monkeypatch.setattr(glm_winrate, "hf_hub_download", lambda **kwargs: path)
    info = dict(glm_winrate.GLM_INFO[glm_name])
    if tol is not None:
        info["kwargs"] = {**info["kwargs"], "tol": tol, "max_iter": 100_000}
    if formula is not None:
        info["formula"] = formula
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return glm_winrate.get_length_controlled_winrate(
            df.copy(), save_weights_dir=None, is_warn_extreme_changes=False,
            glm_info=info)["length_controlled_winrate"]


def ours(df, path):
    preferences = [None if math.isnan(p) else p for p in df["preference"]]
    return winrate.alpaca_eval_length_controlled_win_rate(
        preferences, df["output_2"].str.len().tolist(), df["output_1"].str.len().tolist(),
        winrate.read_instruction_difficulty(path))


CASES = {"n=30": dict(n=30), "n=200": dict(n=200), "n=805": dict(n=805, seed=2),
         "draws and unjudged": dict(n=60, seed=3, draws=0.3, unjudged=0.2),
         "continuous preferences": dict(n=200, seed=4, continuous=True)}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_official_length_controlled_win_rate(files, monkeypatch, case):
    gamed, _, difficulty = files
    df = annotations(difficulty, **case)
    lc = ours(df, gamed)
    # liblinear stops at tol 1e-4; this fit is solved to convergence.
    assert lc == pytest.approx(official(df, gamed, monkeypatch), abs=5e-3)
    assert lc == pytest.approx(official(df, gamed, monkeypatch, tol=1e-10), abs=1e-5)
    # Not the raw win rate, nor the length-only fit: the difficulty and gamed rows matter.
    preferences = [None if math.isnan(p) else p for p in df["preference"]]
    length_only = winrate.length_controlled_win_rate(
        preferences, df["output_2"].str.len().tolist(), df["output_1"].str.len().tolist())
    assert abs(lc - length_only) > 0.1


def test_the_gamed_baselines_and_the_cross_validation_matter(files, monkeypatch):
    gamed, alone, difficulty = files
    df = annotations(difficulty, 30)
    # Without the gamed rows (alpaca_eval's length_controlled_noreg, the difficulty from
    # instruction_difficulty.csv) another number, which alpaca_eval gives too.
    noreg = ours(df, alone)
    assert noreg == pytest.approx(official(df, gamed, monkeypatch, "length_controlled_noreg",
                                           tol=1e-10), abs=1e-5)
    assert abs(noreg - ours(df, gamed)) > 0.5
    df = annotations(difficulty, 200)
    assert ours(df, alone) == pytest.approx(
        official(df, gamed, monkeypatch, "length_controlled_noreg"), abs=5e-3)


DEGENERATE = {  # (preferences, reference lengths, model lengths)
    "all wins": ([2.0] * 6, [50] * 6, [10, 200, 30, 40, 60, 70]),
    "all losses": ([1.0] * 6, [50] * 6, [10, 200, 30, 40, 60, 70]),
    "all draws": ([1.5] * 6, [50] * 6, [10, 200, 30, 40, 60, 70]),
    "identical non-zero length difference": ([2.0, 1.0, 1.5, 1.0], [50] * 4, [80] * 4),
    "unjudged": ([2.0, np.nan, 1.0, np.nan, 1.5, 2.0], [35] * 6, [10, 20, 30, 40, 50, 60]),
}


@pytest.mark.parametrize("case", DEGENERATE.values(), ids=DEGENERATE.keys())
def test_edge_cases_match_alpaca_eval(files, monkeypatch, case):
    gamed, _, _ = files
    df = frame(*case)
    lc = ours(df, gamed)
    assert 0 < lc < 100
    assert lc == pytest.approx(official(df, gamed, monkeypatch), abs=0.05)
    assert lc == pytest.approx(official(df, gamed, monkeypatch, tol=1e-10), abs=1e-5)


@pytest.mark.parametrize("case", [([2.0], [50], [10]), ([2.0, 1.0, 2.0], [50] * 3, [50] * 3)],
                         ids=["n=1", "identical lengths"])
def test_where_alpaca_eval_fails_the_length_feature_is_zero(files, monkeypatch, case):
    gamed, _, _ = files
    df = frame(*case)
    with pytest.raises(ValueError):  # std_delta_len is NaN: patsy drops rows, pandas fails
        official(df, gamed, monkeypatch)
    zeroed = "np.tanh(np.nan_to_num(std_delta_len)) + instruction_difficulty + " \
             "not_gamed_baseline.astype(float) - 1"
    assert ours(df, gamed) == pytest.approx(
        official(df, gamed, monkeypatch, tol=1e-10, formula=zeroed), abs=1e-5)


def test_folds_are_scikit_learns_group_k_fold():
    for n in (5, 12, 37):
        expected = np.zeros(2 * n, int)
        groups = np.tile(np.arange(n), 2)  # alpaca_eval's duplicated rows share a group
        for fold, (_, test) in enumerate(GroupKFold(n_splits=5).split(groups, groups, groups)):
            expected[test] = fold
        assert np.array_equal(np.tile(winrate.group_k_folds(n), 2), expected)


def test_l1_fit_is_liblinears_optimum():
    """The weighted soft-label L1 fit against liblinear on the duplicated rows, run to
    convergence; a strong penalty gives exactly zero, as liblinear."""
    rng = np.random.default_rng(5)
    x = np.stack([np.tanh(rng.normal(0, 1, 300)), rng.normal(0, 1, 300), np.ones(300)], 1)
    p = np.clip(1 / (1 + np.exp(-(x @ [0.8, -0.5, 0.3]))) + rng.normal(0, 0.1, 300), 0, 1)
    s = np.where(rng.random(300) < 0.3, 0.1, 1.0)
    for c in (0.01, 1.0, 100.0):
        reference = LogisticRegression(C=c, penalty="l1", solver="liblinear", tol=1e-12,
                                       fit_intercept=False, max_iter=100_000)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # scikit-learn 1.9 deprecates `penalty`
            reference.fit(np.concatenate([x, x]), np.repeat([1, 0], 300),
                          sample_weight=np.concatenate([s * p, s * (1 - p)]))
        w = winrate.l1_logistic_regression(x, p, s, c)
        np.testing.assert_allclose(w, reference.coef_[0], atol=1e-7)
        assert np.array_equal(w == 0, reference.coef_[0] == 0)
    assert np.all(winrate.l1_logistic_regression(x, p, s, 1e-4) == 0)
