"""The table of a sweep: every run's summary.json, flattened into sweep.csv and sweep.md.

    python launch/sweep.py collect --root /tmp/sweeps --name lr_bs

Stdlib only, like sweep.py, which runs the sweeps and imports this for `collect`.
"""

from __future__ import annotations

import ast
import csv
import fnmatch
import glob
import io
import json
import os
import sys

RUN_RECORD = "sweep_run.json"
SUMMARY_FILE = "summary.json"


class SweepError(ValueError):
    """A --grid/--set argument or the sweep's layout is invalid; the message names it."""


def value_label(value) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)):
        return "+".join(value_label(v) for v in value)
    return repr(value)


def read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def flatten(summary: dict, prefix: str = "") -> dict:
    """Scalars of a nested dict with dotted keys; lists (and other containers) left out."""
    flat = {}
    for key, value in summary.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        elif value is None or isinstance(value, (bool, int, float, str)):
            flat[f"{prefix}{key}"] = value
    return flat


def parse_run_name(name: str) -> dict:
    """Grid values back from a run directory name (for runs without a sweep_run.json, e.g.
    ones made on a TPU); numbers come back as numbers, the rest as text."""
    values = {}
    for part in name.split(","):
        key, sep, text = part.partition("=")
        if not sep:
            return {}
        try:
            values[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            values[key] = text
    return values


def find_summaries(run_dir: str) -> list[str]:
    return sorted(glob.glob(os.path.join(run_dir, "**", SUMMARY_FILE), recursive=True))


def collect_rows(sweep_dir: str, metrics: list[str] | None = None):
    """(columns, rows, runs without a summary) for the runs under `sweep_dir`."""
    run_dirs = sorted(d for d in os.listdir(sweep_dir)
                      if os.path.isdir(os.path.join(sweep_dir, d)))
    found = {d: find_summaries(os.path.join(sweep_dir, d)) for d in run_dirs}
    unfinished = [d for d in run_dirs if not found[d]]
    stage_dirs = {os.path.relpath(os.path.dirname(p), os.path.join(sweep_dir, d))
                  for d in run_dirs for p in found[d]}
    # One stage for the whole sweep: bare field names; several: prefix with the stage dir.
    prefixed = len(stage_dirs) > 1

    records = []
    for d in run_dirs:
        if not found[d]:
            continue
        record = read_json(os.path.join(sweep_dir, d, RUN_RECORD)) or {}
        grid = record.get("grid") or parse_run_name(d)
        fields = {}
        for path in found[d]:
            summary = read_json(path)
            if not isinstance(summary, dict):
                continue
            stage = os.path.relpath(os.path.dirname(path), os.path.join(sweep_dir, d))
            prefix = f"{stage}/" if prefixed and stage != "." else ""
            fields.update(flatten(summary, prefix))
        if metrics:
            fields = {k: v for k, v in fields.items()
                      if any(fnmatch.fnmatchcase(k, pattern) for pattern in metrics)}
        records.append((record.get("index", len(records)), d, grid, fields))
    records.sort(key=lambda r: (r[0], r[1]))

    grid_columns, field_columns = [], []
    for _, _, grid, fields in records:
        grid_columns += [k for k in grid if k not in grid_columns]
        field_columns += [k for k in fields if k not in field_columns]
    if metrics:  # in the order asked for; a pattern's matches in the summary's order
        field_columns.sort(key=lambda k: next(
            i for i, pattern in enumerate(metrics) if fnmatch.fnmatchcase(k, pattern)))
    # A summary field named like a grid column keeps both, the field under summary.<name>.
    renamed = {k: (f"summary.{k}" if k in grid_columns or k == "run" else k)
               for k in field_columns}
    columns = ["run", *grid_columns, *renamed.values()]
    rows = []
    for _, name, grid, fields in records:
        row = {"run": name, **{k: grid.get(k) for k in grid_columns}}
        row.update({renamed[k]: fields.get(k) for k in field_columns})
        rows.append(row)
    return columns, rows, unfinished


def cell(value, precise: bool) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and not precise:
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        return value_label(value)
    return str(value)


def to_csv(columns: list[str], rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([cell(row.get(c), precise=True) for c in columns])
    return out.getvalue()


def to_markdown(columns: list[str], rows: list[dict]) -> str:
    def line(cells):
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"
    out = [line(columns), line(["---"] * len(columns))]
    out += [line([cell(row.get(c), precise=False) for c in columns]) for row in rows]
    return "\n".join(out) + "\n"


def collect(root: str, sweep: str, metrics: list[str] | None = None) -> tuple[str, str, str]:
    """Writes sweep.csv and sweep.md in <root>/<sweep>/; returns (csv path, md path, md)."""
    if "://" in root:
        raise SweepError(f"--root {root!r}: collect reads a local directory; copy the "
                         "summaries first, e.g. gcloud storage rsync --recursive "
                         "--exclude='.*(checkpoints|final|tensorboard)/.*' "
                         f"{root}/{sweep} /tmp/sweeps/{sweep}")
    sweep_dir = os.path.join(root, sweep)
    if not os.path.isdir(sweep_dir):
        raise SweepError(f"--root/--name: {sweep_dir} is not a directory")
    columns, rows, unfinished = collect_rows(sweep_dir, metrics)
    if not rows:
        raise SweepError(f"no {SUMMARY_FILE} under {sweep_dir}/*/ (no run has finished)")
    if unfinished:
        print(f"collect: no {SUMMARY_FILE} yet in: {', '.join(unfinished)}", file=sys.stderr)
    markdown = to_markdown(columns, rows)
    csv_path, md_path = os.path.join(sweep_dir, "sweep.csv"), os.path.join(sweep_dir, "sweep.md")
    with open(csv_path, "w") as f:
        f.write(to_csv(columns, rows))
    with open(md_path, "w") as f:
        f.write(markdown)
    return csv_path, md_path, markdown
