#!/usr/bin/env bash
# The GPU run of the benchmarks, in one go (at most ~8 minutes on one H200): SFT step vs the
# torch.compile'd transformers peer, generation vs transformers' static-cache compiled
# generate, and a PPO iteration's phase split. Each part runs under its own `timeout`, so a
# hang costs that part only. Writes into $OUT (default bench/gpu_out/):
#   results.json  every part: command, exit status, seconds, parsed numbers, goals, met or not
#   results.md    the same as a markdown table
#   sft.log generate.log ppo.log  each part's full output (generate.json: its rows)
#   env.log       date and nvidia-smi's GPU line
#
#   bash bench/gpu.sh             # on the GPU machine (from anywhere; runs in the repo root)
#   bash bench/gpu.sh --smoke     # on CPU: every size shrunk, the script end to end (< 3 min)
#
# Python: $PYTHON, else .venv/bin/python when present, else python3 (or python). The repo root goes on
# PYTHONPATH, so the package need not be installed. --smoke drops the peer's torch.compile
# (inductor on CPU takes minutes even for the tiny model); its numbers mean nothing, only
# the script's shape does.
set -u
if [ -n "${OUT:-}" ]; then mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd); fi  # before the cd
cd "$(dirname "$0")/.."
ROOT=$PWD
SMOKE=0
if [ "${1:-}" = "--smoke" ]; then SMOKE=1; fi
OUT=${OUT:-$ROOT/bench/gpu_out}
mkdir -p "$OUT"
rm -f "$OUT"/results.json "$OUT"/results.md "$OUT"/generate.json "$OUT"/*.log \
  "$OUT"/*.status
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python
  elif command -v python3 > /dev/null; then PYTHON=python3
  else PYTHON=python; fi
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export TF_CPP_MIN_LOG_LEVEL=3

if [ "$SMOKE" = 1 ]; then
  export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
  SFT_ARGS="--configs tiny --batch 2 --seq 32 --iters 1 --warmup 1"
  GEN_ARGS="--configs tiny --batch 2 --prompt 8 --new 8 --iters 1"
  PPO_ARGS="--configs tiny --batch 4 --prompt 8 --new 8 --iterations 2 --epochs 1 --minibatches 1"
  CONFIG=tiny
else
  # The commands of bench/RESULTS.md ("GPU — not measured yet"), sized to the time budget.
  SFT_ARGS="--configs tinyllama --batch 8 --seq 2048 --remat dots --logits_chunk 512 --torch_compile --iters 10 --warmup 2"
  GEN_ARGS="--configs tinyllama --batch 64 --prompt 128 --new 256 --iters 2"
  PPO_ARGS="--configs tinyllama --batch 64 --prompt 128 --new 256 --iterations 2"
  CONFIG=tinyllama
fi
# Seconds per part: 180 + 130 + 150 = 460 s at most, plus start-up.
SFT_TIMEOUT=${SFT_TIMEOUT:-180}
GEN_TIMEOUT=${GEN_TIMEOUT:-130}
PPO_TIMEOUT=${PPO_TIMEOUT:-150}

# What ran where (cheap: no Python).
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1; } \
  > "$OUT/env.log" 2>&1 || true

run_part() {  # name timeout_s command...: log to $OUT/name.log, status to $OUT/name.status
  local name=$1 limit=$2
  shift 2
  echo "== $name (timeout ${limit}s): $*"
  local began=$SECONDS
  timeout -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$rc $((SECONDS - began))" > "$OUT/$name.status"
  tail -n 4 "$OUT/$name.log"
  echo "   exit $rc after $((SECONDS - began)) s"
}

# The torch peer shares the GPU with JAX in the same process: JAX takes 45% of it, not 75%.
XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.45} \
  run_part sft "$SFT_TIMEOUT" "$PYTHON" bench/sft_step.py $SFT_ARGS
XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.45} \
  run_part generate "$GEN_TIMEOUT" "$PYTHON" bench/generate.py $GEN_ARGS --ours both \
  --static --skip_dynamic --json "$OUT/generate.json"
run_part ppo "$PPO_TIMEOUT" "$PYTHON" bench/ppo.py $PPO_ARGS

OUT="$OUT" SMOKE="$SMOKE" CONFIG="$CONFIG" SFT_ARGS="$SFT_ARGS" GEN_ARGS="$GEN_ARGS" \
  PPO_ARGS="$PPO_ARGS" "$PYTHON" - <<'EOF'
"""Parses the three logs into results.json and results.md (goals from issue 16's brief)."""
import datetime
import json
import os
import re

out, smoke, config = os.environ["OUT"], os.environ["SMOKE"] == "1", os.environ["CONFIG"]
PEER_SFT, PEER_GEN = 58_400, 10_100  # REFERENCES.md, H200: compiled peers' tokens/s


def number(text):
    text = text.strip().rstrip("%x").replace(",", "")
    try:
        return float(text)
    except ValueError:
        return None


def status(name):
    try:
        rc, seconds = open(os.path.join(out, f"{name}.status")).read().split()
    except OSError:
        return {"rc": None, "seconds": None, "timed_out": False}
    return {"rc": int(rc), "seconds": int(seconds), "timed_out": int(rc) in (124, 137)}


def row_of(name, first_word):
    """The first log line whose first field is `first_word` (a config name), split."""
    try:
        lines = open(os.path.join(out, f"{name}.log")).read().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if fields and fields[0] == first_word:
            return fields
    return None


def tail(name, n=6):
    try:
        return open(os.path.join(out, f"{name}.log")).read().splitlines()[-n:]
    except OSError:
        return []


parts = {}

sft = {"command": "python bench/sft_step.py " + os.environ["SFT_ARGS"], **status("sft")}
fields = row_of("sft", config)
# config params batch x seq ours torch ratio ours_mfu torch_mfu
if fields and len(fields) >= 10:
    sft.update(tokens_per_s=number(fields[5]), peer_tokens_per_s=number(fields[6]),
               ratio=number(fields[7]),
               mfu=None if number(fields[8]) is None else number(fields[8]) / 100,
               peer_mfu=None if number(fields[9]) is None else number(fields[9]) / 100)
sft["goals"] = {
    "mfu >= 65%": None if sft.get("mfu") is None else sft["mfu"] >= 0.65,
    f">= 1.3x the compiled peer's {PEER_SFT:,} tok/s": None if sft.get("tokens_per_s") is None
    else sft["tokens_per_s"] >= 1.3 * PEER_SFT,
    ">= 1.3x the compiled peer measured here": None if sft.get("ratio") is None
    else sft["ratio"] >= 1.3}
parts["sft"] = sft

gen = {"command": "python bench/generate.py " + os.environ["GEN_ARGS"]
       + " --ours both --static --skip_dynamic", **status("generate")}
try:
    rows = json.load(open(os.path.join(out, "generate.json")))
    row = rows[0]
    gen.update(decoder_new_tokens_per_s=row.get("decoder_tok_s"),
               generate_new_tokens_per_s=row.get("ours_tok_s"),
               peer_static_new_tokens_per_s=row.get("static_tok_s"),
               ratio=row.get("ratio_static"))
except (OSError, ValueError, IndexError, KeyError):
    pass
ours = gen.get("decoder_new_tokens_per_s")
gen["goals"] = {
    ">= 30k new tok/s": None if ours is None else ours >= 30_000,
    f">= 3x the peer's {PEER_GEN:,} new tok/s": None if ours is None else ours >= 3 * PEER_GEN,
    ">= 3x the static peer measured here": None if gen.get("ratio") is None
    else gen["ratio"] >= 3}
parts["generate"] = gen

ppo = {"command": "python bench/ppo.py " + os.environ["PPO_ARGS"], **status("ppo")}
fields = row_of("ppo", config)
# config rollout_s scoring_s update_s share peer (response length n)
if fields and len(fields) >= 5:
    ppo.update(time_rollout_s=number(fields[1]), time_scoring_s=number(fields[2]),
               time_update_s=number(fields[3]),
               rollout_share=None if number(fields[4]) is None else number(fields[4]) / 100)
ppo["goals"] = {"rollout < 50% of an iteration": None if ppo.get("rollout_share") is None
                else ppo["rollout_share"] < 0.5}
parts["ppo"] = ppo

for name, part in parts.items():
    if part["rc"] != 0:
        part["log_tail"] = tail(name)

device = None
for line in open(os.path.join(out, "sft.log")) if os.path.exists(os.path.join(out, "sft.log")) \
        else []:
    match = re.match(r"jax (\S+) on (.*?);", line)
    if match:
        device = match.group(2)
        break
result = {"date": datetime.date.today().isoformat(), "smoke": smoke, "device": device,
          "parts": parts}
with open(os.path.join(out, "results.json"), "w") as f:
    json.dump(result, f, indent=1)


def cell(value, fmt):
    return "—" if value is None else format(value, fmt)


def met(flag):
    return {True: "yes", False: "**no**", None: "—"}[flag]


lines = [f"# GPU benchmarks{' (SMOKE: CPU, shrunk sizes; numbers mean nothing)' if smoke else ''}",
         "", f"{result['date']}, {device or 'device unknown'}", "",
         "| part | measured | peer | ratio | goal | met | status |", "|---|---|---|---|---|---|---|"]


def state(part):
    if part["rc"] is None:
        return "not run"
    return "timed out" if part["timed_out"] else f"exit {part['rc']}, {part['seconds']} s"


goals = list(sft["goals"].items())
lines.append(f"| SFT step ({config}) | {cell(sft.get('tokens_per_s'), ',.0f')} tok/s, MFU "
             f"{cell(sft.get('mfu'), '.1%')} | {cell(sft.get('peer_tokens_per_s'), ',.0f')} "
             f"tok/s ({'eager' if smoke else 'torch.compile'}), MFU "
             f"{cell(sft.get('peer_mfu'), '.1%')} | "
             f"{cell(sft.get('ratio'), '.2f')} | {goals[0][0]}; {goals[1][0]} | "
             f"{met(goals[0][1])}; {met(goals[1][1])} | {state(sft)} |")
goals = list(gen["goals"].items())
lines.append(f"| generation ({config}, Decoder) | {cell(ours, ',.0f')} new tok/s (plain "
             f"sampling.generate {cell(gen.get('generate_new_tokens_per_s'), ',.0f')}) | "
             f"{cell(gen.get('peer_static_new_tokens_per_s'), ',.0f')} new tok/s (static "
             f"cache, compiled) | {cell(gen.get('ratio'), '.2f')} | {goals[0][0]}; "
             f"{goals[2][0]} | {met(goals[0][1])}; {met(goals[2][1])} | {state(gen)} |")
lines.append(f"| PPO iteration ({config}) | rollout {cell(ppo.get('time_rollout_s'), '.3f')} s,"
             f" scoring {cell(ppo.get('time_scoring_s'), '.3f')} s, update "
             f"{cell(ppo.get('time_update_s'), '.3f')} s: rollout "
             f"{cell(ppo.get('rollout_share'), '.1%')} | HF-generate PPO: 80–90% | — | "
             f"rollout < 50% | {met(ppo['goals']['rollout < 50% of an iteration'])} | "
             f"{state(ppo)} |")
lines += ["", "Commands:", ""] + [f"    {p['command']}" for p in parts.values()]
with open(os.path.join(out, "results.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
