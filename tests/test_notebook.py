"""notebooks/explore.ipynb runs top to bottom in a fresh kernel and shows real results.

The kernel is this interpreter (a kernelspec written to a temporary folder, so nothing in the
user's Jupyter setup is used or touched), on one CPU device, with its work files in a
temporary directory.
"""

import ast
import base64
import json
import math
import os
import re
import sys
import time

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

from xwin_jax.data import synthetic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "notebooks", "explore.ipynb")


def kernel_manager(tmp_path):
    """A KernelManager for this Python, with the notebook's environment: one CPU device (not
    the eight fake devices of conftest), work files under tmp_path."""
    spec_dir = tmp_path / "kernels" / "python3"
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (xwin_jax test)", "language": "python",
        "env": {"XWIN_NOTEBOOK_WORKDIR": str(tmp_path / "work"), "JAX_PLATFORMS": "cpu",
                "XLA_FLAGS": "", "TF_CPP_MIN_LOG_LEVEL": "3"}}))
    specs = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")])
    return KernelManager(kernel_name="python3", kernel_spec_manager=specs)


def stdout_of(cell) -> str:
    return "".join(o.get("text", "") for o in cell.outputs
                   if o.output_type == "stream" and o.name == "stdout")


def code_cell_with(nb, text):
    matches = [c for c in nb.cells if c.cell_type == "code" and text in c.source]
    assert len(matches) == 1, f"expected one code cell containing {text!r}"
    return matches[0]


def test_saved_notebook_is_valid_and_has_no_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    assert nb.nbformat == 4 and nb.metadata.kernelspec.name == "python3"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("notebook")
    repo_work = os.path.join(REPO, "notebook_work")
    existed = os.path.exists(repo_work)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(nb, km=kernel_manager(tmp_path), timeout=600,
                            resources={"metadata": {"path": os.path.join(REPO, "notebooks")}})
    started = time.perf_counter()
    client.execute()
    print(f"notebook executed in {time.perf_counter() - started:.1f} s (kernel start included)")
    assert os.path.exists(repo_work) == existed, "the notebook wrote into the repository"
    return nb, tmp_path / "work"


def test_sft_loss_falls_and_matches_the_jobs_metrics(executed):
    nb, work = executed
    text = stdout_of(code_cell_with(nb, "sft.train_sft("))
    found = re.search(r"SFT loss: step (\d+) ([\d.]+) -> step (\d+) ([\d.]+)", text)
    assert found, text
    first_step, first, last_step, last = (int(found[1]), float(found[2]), int(found[3]),
                                          float(found[4]))
    assert (first_step, last_step) == (1, 40)
    assert first > 5.0  # about log(512) at random init
    assert last < first - 1.0, (first, last)
    with open(work / "sft" / "metrics.jsonl") as f:
        losses = [r["train/loss"] for r in map(json.loads, f) if "train/loss" in r]
    assert len(losses) == 40
    assert (round(losses[0], 4), round(losses[-1], 4)) == (first, last)
    assert (work / "sft" / "final" / "model_config.json").exists()


def test_generated_answers_are_rated_by_the_rule_judge(executed):
    nb, _ = executed
    text = stdout_of(code_cell_with(nb, "sampling.generate("))
    questions = re.findall(r"^Q: (.*)$", text, re.M)
    answers = [ast.literal_eval(a) for a in re.findall(r"^   model:    ('.*'|\".*\") \(finished",
                                                       text, re.M)]
    scores = [int(s) for s in re.findall(r"^   judge:    (\d+)/10", text, re.M)]
    assert len(questions) == len(answers) == len(scores) == 6, text
    judge = synthetic.RuleJudge()
    assert scores == [judge.rate(q, a).score for q, a in zip(questions, answers)]


def test_reward_model_table_has_judge_scores_and_rewards(executed):
    nb, work = executed
    text = stdout_of(code_cell_with(nb, "reward.train_reward("))
    accuracy = float(re.search(r"RM held-out pair accuracy: ([\d.]+)", text)[1])
    assert 0.0 <= accuracy <= 1.0
    rows = re.findall(r"^\| +(\d+) \| .* \| +(\d+) \| +(-?\d+\.\d+) \| +(-?\d+\.\d+) \|$",
                      text, re.M)
    assert [int(r[0]) for r in rows] == [1, 2, 3, 4, 5, 6], text
    assert all(1 <= int(r[1]) <= 10 for r in rows)
    rewards = [float(v) for r in rows for v in r[2:]]
    assert all(math.isfinite(v) for v in rewards) and len(set(rewards)) > 1
    with open(work / "reward" / "final" / "reward_stats.json") as f:
        assert json.load(f)["std"] > 0


def test_training_curves_are_plotted(executed):
    nb, _ = executed
    cell = code_cell_with(nb, "plt.subplots(")
    images = [o.data["image/png"] for o in cell.outputs if "image/png" in o.get("data", {})]
    assert len(images) == 1
    png = base64.b64decode(images[0])
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 20_000
    seconds = float(re.search(r"notebook ran in ([\d.]+) s", stdout_of(cell))[1])
    print(f"notebook cells ran in {seconds:.1f} s")
    assert seconds < 600
