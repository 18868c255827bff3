"""The collectives of a compiled XLA program, read from its optimized HLO text.

    compiled = jax.jit(f).lower(*args).compile()
    for c in collectives(compiled.as_text()):
        c.op, c.shapes, c.nbytes, c.inside_loop, c.loops

What a sharding decision costs is visible only after XLA's SPMD partitioner has run: which
arrays get all-gathered, and whether that happens once or inside a loop (scanned layers, a
decode `while_loop`, micro-batches). This module parses `compiled.as_text()` just enough to
answer that: every collective instruction, its result shape(s) and bytes per device, and the
`while` loops around it (outermost first, with XLA's known trip count where it has one).

Byte counts are of each instruction's *result* per device: an all-gather's gathered array,
a reduce-scatter's shard, an all-reduce's whole array. Asynchronous pairs count once:
`all-gather-start` by the output half of its tuple, `collective-permute-start` by its
output, `*-done` not at all; an `async-start` wrapper through the op in the computation it
calls. A loop's body and condition both count as inside the loop (both run every iteration).
A computation reached along several call paths is listed once per path.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import tempfile
from typing import Any, Iterable

DTYPE_BYTES = {"pred": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1,
               "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
               "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all",
               "collective-permute", "collective-broadcast", "ragged-all-to-all")

_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s+([a-z][\w\-]*)\(")
_SHAPE = re.compile(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([^\]]*)\]")
_COMMENT = re.compile(r"/\*.*?\*/")
_CALLED = re.compile(r"\b(body|condition|calls|to_apply|true_computation|false_computation)"
                     r"=%?([\w.\-]+)")
_CALLED_LISTS = re.compile(r"\b(?:branch_computations|called_computations|calls)=\{([^}]*)\}")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_OP_NAME = re.compile(r'op_name="([^"]*)"')


@dataclasses.dataclass(frozen=True)
class Loop:
    """A `while` instruction: its name, body, XLA's trip count (None when XLA cannot tell,
    e.g. a decode loop that stops early) and its metadata op_name (e.g.
    'jit(_generate)/while')."""
    name: str
    computation: str  # where the while instruction sits
    body: str
    condition: str
    trip_count: int | None
    op_name: str


@dataclasses.dataclass(frozen=True)
class Collective:
    op: str  # the base op: 'all-gather', 'all-reduce', ... (no -start)
    name: str  # the instruction's name
    computation: str
    shapes: tuple[tuple[str, tuple[int, ...]], ...]  # result arrays: (dtype, dims)
    loops: tuple[Loop, ...]  # enclosing while loops, outermost first
    op_name: str  # metadata op_name ('' if none)

    @property
    def nbytes(self) -> int:
        """Result bytes per device (one execution)."""
        return sum(_array_bytes(dtype, dims) for dtype, dims in self.shapes)

    @property
    def bytes_by_dtype(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for dtype, dims in self.shapes:
            out[dtype] = out.get(dtype, 0) + _array_bytes(dtype, dims)
        return out

    @property
    def inside_loop(self) -> bool:
        return bool(self.loops)

    def executions_within(self, loop: Loop | None = None) -> int | None:
        """How many times this runs per iteration of `loop` (one of self.loops; None: per run
        of the whole program): the product of the trip counts of the loops inside it. None
        if one of those trip counts is unknown."""
        loops = self.loops
        if loop is not None:
            loops = loops[[x.name for x in loops].index(loop.name) + 1:]
        count = 1
        for inner in loops:
            if inner.trip_count is None:
                return None
            count *= inner.trip_count
        return count


@dataclasses.dataclass
class _Instruction:
    name: str
    op: str
    type_text: str
    line: str
    called: list[tuple[str, str]]  # (attribute, computation)


def _array_bytes(dtype: str, dims: tuple[int, ...]) -> int:
    count = 1
    for d in dims:
        count *= d
    return count * DTYPE_BYTES[dtype]


def _top_level(type_text: str) -> list[str]:
    """A tuple type's top-level elements ('(a, (b, c))' → ['a', '(b, c)']); else [type]."""
    text = type_text.strip()
    if not text.startswith("("):
        return [text]
    parts, depth, start = [], 0, 1
    for i, ch in enumerate(text):
        if ch in "({[":
            depth += 1
        elif ch in ")}]":
            depth -= 1
            if depth == 0:
                parts.append(text[start:i])
        elif ch == "," and depth == 1:
            parts.append(text[start:i])
            start = i + 1
    return [p.strip() for p in parts if p.strip()]


def _arrays(type_text: str) -> list[tuple[str, tuple[int, ...]]]:
    out = []
    for dtype, dims in _SHAPE.findall(type_text):
        if dtype in DTYPE_BYTES:
            out.append((dtype, tuple(int(d) for d in dims.replace("<=", "").split(",")
                                     if d.strip())))
    return out


def parse(hlo_text: str) -> tuple[str | None, dict[str, list[_Instruction]]]:
    """(entry computation name, {computation: its instructions}) of an HLO module's text."""
    computations: dict[str, list[_Instruction]] = {}
    entry, current = None, None
    for line in hlo_text.splitlines():
        if not line.strip() or line.lstrip().startswith("//"):
            continue
        if not line[0].isspace():  # a computation header ("%name (...) -> ... {", "ENTRY ...")
            if line.rstrip().endswith("{") and not line.startswith("HloModule"):
                is_entry = line.startswith("ENTRY ")
                head = line[len("ENTRY "):] if is_entry else line
                current = head.split()[0].split("(")[0].lstrip("%")
                computations.setdefault(current, [])
                if is_entry:
                    entry = current
            elif line.startswith("}"):
                current = None
            continue
        if current is None:
            continue
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        name, type_text, op = match.groups()
        called = _CALLED.findall(line)
        for items in _CALLED_LISTS.findall(line):
            called += [("calls", c.strip().lstrip("%")) for c in items.split(",") if c.strip()]
        computations[current].append(
            _Instruction(name, op, _COMMENT.sub("", type_text), line, called))
    return entry, computations


def collectives(hlo_text: str) -> list[Collective]:
    """Every collective reachable from the entry computation, with the loops around it (see
    the module docstring). Without an ENTRY (a fragment), every computation is a root."""
    entry, computations = parse(hlo_text)
    roots = [entry] if entry is not None else list(computations)
    out: list[Collective] = []

    def visit(name: str, loops: tuple[Loop, ...], path: frozenset[str]) -> None:
        if name in path:  # recursion cannot happen in HLO; guard anyway
            return
        path = path | {name}
        for inst in computations.get(name, ()):
            base = inst.op[:-len("-start")] if inst.op.endswith("-start") else inst.op
            if base in COLLECTIVES and not inst.op.endswith("-done"):
                parts = _top_level(inst.type_text)
                if inst.op == "all-gather-start" and len(parts) > 1:
                    parts = parts[len(parts) // 2:]
                elif inst.op == "collective-permute-start" and len(parts) > 1:
                    parts = parts[1:2]
                op_name = _OP_NAME.search(inst.line)
                out.append(Collective(base, inst.name, name, tuple(_arrays(" ".join(parts))),
                                      loops, op_name.group(1) if op_name else ""))
            if inst.op == "while":
                targets = dict(inst.called)
                trip = _TRIP_COUNT.search(inst.line)
                op_name = _OP_NAME.search(inst.line)
                loop = Loop(inst.name, name, targets.get("body", ""),
                            targets.get("condition", ""),
                            int(trip.group(1)) if trip else None,
                            op_name.group(1) if op_name else "")
                for attr, callee in inst.called:
                    inner = loops + (loop,) if attr in ("body", "condition") else loops
                    visit(callee, inner, path)
            else:
                for _, callee in inst.called:
                    visit(callee, loops, path)

    for root in roots:
        visit(root, (), frozenset())
    return out


def loops(hlo_text: str) -> list[Loop]:
    """Every `while` loop reachable from the entry computation, outer loops first."""
    entry, computations = parse(hlo_text)
    found: list[Loop] = []
    seen: set[str] = set()
    todo = [entry] if entry is not None else list(computations)
    while todo:
        name = todo.pop(0)
        if name in seen:
            continue
        seen.add(name)
        for inst in computations.get(name, ()):
            if inst.op == "while":
                targets = dict(inst.called)
                trip = _TRIP_COUNT.search(inst.line)
                op_name = _OP_NAME.search(inst.line)
                found.append(Loop(inst.name, name, targets.get("body", ""),
                                  targets.get("condition", ""),
                                  int(trip.group(1)) if trip else None,
                                  op_name.group(1) if op_name else ""))
            todo.extend(callee for _, callee in inst.called)
    return found


def total_bytes(items: Iterable[Collective], per: Loop | None = None,
                ) -> dict[str, dict[str, int]]:
    """{op: {dtype: bytes}} of `items`, each weighted by how often it runs per iteration of
    `per` (per run of the program when None; inner loops without a known trip count count
    once)."""
    totals: dict[str, dict[str, int]] = {}
    for c in items:
        times = c.executions_within(per if per is not None and per in c.loops else None)
        for dtype, n in c.bytes_by_dtype.items():
            by_dtype = totals.setdefault(c.op, {})
            by_dtype[dtype] = by_dtype.get(dtype, 0) + n * (1 if times is None else times)
    return totals


def collective_bytes(hlo_text: str, inside_loops: bool = False) -> dict[str, dict[str, int]]:
    """{op: {dtype: bytes}} of every collective in the program, each counted once (a loop's
    body once, not once per iteration); inside_loops: only those inside some while loop.
    What bench/common.collective_bytes counts (but a computation reached along several call
    paths counts once per path), for code that must not import bench/."""
    items = [c for c in collectives(hlo_text) if c.inside_loop or not inside_loops]
    totals: dict[str, dict[str, int]] = {}
    for c in items:
        for dtype, n in c.bytes_by_dtype.items():
            by_dtype = totals.setdefault(c.op, {})
            by_dtype[dtype] = by_dtype.get(dtype, 0) + n
    return totals


# The module right after SPMD partitioning: what the partitioner asks an accelerator to move
# (XLA:CPU widens bf16 collectives to f32 after it).
PARTITIONED_PASS = "spmd-partitioning"


def partitioned_hlo(lowered) -> tuple[str, Any]:
    """(the module's text right after SPMD partitioning, the compiled executable) of one
    compile of a jax `Lowered`; the text comes from XLA's pass dump, in a temporary
    directory. `compiled.as_text()` is the backend's final module."""
    dump = tempfile.mkdtemp(prefix="fsdp_gathers_")
    try:
        compiled = lowered.compile(compiler_options={
            "xla_dump_to": dump, "xla_dump_hlo_as_text": True,
            "xla_dump_hlo_pass_re": PARTITIONED_PASS})
        names = sorted(n for n in os.listdir(dump)
                       if f"after_{PARTITIONED_PASS}." in n and n.endswith(".txt"))
        if not names:
            raise RuntimeError(f"XLA dumped no module after {PARTITIONED_PASS} in {dump}")
        with open(os.path.join(dump, names[-1])) as f:
            return f.read(), compiled
    finally:
        shutil.rmtree(dump, ignore_errors=True)
