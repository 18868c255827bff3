"""Xwin-Set: every prompt's n sampled responses with their reward scores — best-of-k for any
k <= n, and DPO pairs whose rejected answer comes from the policy's own samples.

    entries = formats.read_xwin_set("workdir/xwin_set/samples.jsonl").records
    best_of(entries[0], k=8)                      # index of the winner among the first 8
    made = make_pairs(entries, PairRule("lowest", min_margin=0.5))
    made.pairs, made.skipped                      # PreferencePairs; {"reason": count}

What a response must be to take part (`eligible`): finished (it ended with EOS, so the text is
what the model meant to say, and DPO's `</s>` after it is the model's own) and not empty.
Only the first k samples of each prompt count when `best_of=k` is set: the first k of n
samples drawn with per-(prompt, sample) keys are exactly a k-sample run's, so one sampling
run serves every k <= n (the paper's ablation over the number of candidates).

The pair rule (`PairRule.rejected`); the eligible, distinct responses are ranked by score,
best first, and the chosen answer is always the best:

    lowest         the lowest-scored one (the default: the widest contrast)
    rank           the one at `rank` in that order (0 = the best itself is not allowed;
                   1 = the runner-up; -1 = the lowest, -2 the one above it, ...)
    percentile     the one at `percentile` of the score order, 0 = the lowest, 100 = the
                   runner-up: rank round((1 - percentile/100) * (m - 1)) clipped to [1, m - 1]
                   among m eligible responses
    sampled_below  one drawn uniformly from those scoring at least `min_margin` below the
                   best (a seeded draw per prompt: numpy default_rng([seed, prompt index]))

Each text counts once, at its best place (`distinct`: n samples of a short answer repeat
each other, and a runner-up equal to the best teaches nothing). A prompt gives no pair — and
is counted in `skipped` by reason — when it has fewer than two eligible responses
(`too_few`), when they are all the same text (`identical`), when the rule's rank does not
exist (`no_such_rank`), or when the rejected one scores less than `min_margin` below the
chosen (`margin`: the responses do not differ enough to teach anything).
Scores are the RM's normalised rewards (reward_stats.json), so the margin is in reward
standard deviations.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Sequence

import numpy as np

from xwin_jax.data.formats import PreferencePair, XwinSetEntry
from xwin_jax.errors import ConfigError

REJECTED_RULES = ("lowest", "rank", "percentile", "sampled_below")
SKIP_REASONS = ("too_few", "no_such_rank", "identical", "margin")


@dataclasses.dataclass(frozen=True)
class PairRule:
    rejected: str = "lowest"
    rank: int = -1               # for 'rank'
    percentile: float = 0.0      # for 'percentile'
    min_margin: float = 0.0      # chosen score - rejected score must be at least this
    best_of: int | None = None   # only the first k samples of each prompt (None: all n)
    seed: int = 0                # for 'sampled_below'

    def __post_init__(self):
        if self.rejected not in REJECTED_RULES:
            raise ConfigError(f"PairRule.rejected={self.rejected!r}: choose one of "
                              f"{REJECTED_RULES}")
        if self.rejected == "rank" and self.rank == 0:
            raise ConfigError("PairRule.rank=0 is the chosen answer itself: use 1 (the "
                              "runner-up) or a negative rank (-1 = the lowest)")
        if not 0.0 <= self.percentile <= 100.0:
            raise ConfigError(f"PairRule.percentile={self.percentile}: must lie in [0, 100]")
        if self.min_margin < 0:
            raise ConfigError(f"PairRule.min_margin={self.min_margin}: must be >= 0")
        if self.best_of is not None and self.best_of < 1:
            raise ConfigError(f"PairRule.best_of={self.best_of}: need at least 1 sample")


def eligible(entry: XwinSetEntry, best_of: int | None = None) -> list[int]:
    """Indices of the finished, non-empty responses among the first `best_of` samples."""
    count = len(entry.responses) if best_of is None else best_of
    if count > len(entry.responses):
        raise ConfigError(f"{entry.source}: best_of={best_of} but the prompt has only "
                          f"{len(entry.responses)} samples",
                          hint="sample more (num_samples) or lower best_of")
    return [i for i in range(count) if entry.finished[i] and entry.responses[i].strip()]


def ranked(entry: XwinSetEntry, best_of: int | None = None) -> list[int]:
    """The eligible responses, best score first (ties: the earlier sample first)."""
    return sorted(eligible(entry, best_of), key=lambda i: (-entry.scores[i], i))


def distinct(order: list[int], entry: XwinSetEntry) -> list[int]:
    """`order` with each text kept once, at its first (best) place: with many samples of
    short answers the runner-up is often the best one again, which would teach nothing."""
    seen: set[str] = set()
    kept = []
    for i in order:
        if entry.responses[i] not in seen:
            seen.add(entry.responses[i])
            kept.append(i)
    return kept


def best_of(entry: XwinSetEntry, k: int | None = None, threshold: float | None = None
            ) -> int | None:
    """The best eligible response among the first k samples (None: all), or None when there
    is none or it scores below `threshold`."""
    order = ranked(entry, k)
    if not order or (threshold is not None and entry.scores[order[0]] < threshold):
        return None
    return order[0]


def _rejected(order: list[int], entry: XwinSetEntry, rule: PairRule) -> int | None:
    m = len(order)
    if rule.rejected == "lowest":
        return order[-1]
    if rule.rejected == "rank":
        position = rule.rank if rule.rank > 0 else m + rule.rank
        return order[position] if 1 <= position < m else None
    if rule.rejected == "percentile":
        position = int(round((1 - rule.percentile / 100) * (m - 1)))
        return order[min(max(position, 1), m - 1)]
    best = entry.scores[order[0]]
    below = [i for i in order[1:] if best - entry.scores[i] >= rule.min_margin]
    if not below:
        return None
    return below[int(np.random.default_rng([rule.seed, entry.index]).integers(len(below)))]


@dataclasses.dataclass
class MadePairs:
    pairs: list[PreferencePair]
    scores: list[tuple[float, float]]  # (chosen, rejected) per pair
    skipped: dict[str, int]            # by reason (SKIP_REASONS), zeros included

    def report(self) -> str:
        skipped = skips_text(self.skipped)
        return f"{len(self.pairs)} pairs" + (f" (prompts skipped: {skipped})" if skipped else "")


def skips_text(skipped: dict[str, int]) -> str:
    """'3 too_few, 1 margin': the prompts that gave no pair, by reason ('' for none)."""
    return ", ".join(f"{n} {reason}" for reason, n in skipped.items() if n)


def make_pairs(entries: Sequence[XwinSetEntry], rule: PairRule = PairRule()) -> MadePairs:
    """A DPO pair per prompt under `rule` (see the module docstring), in entry order."""
    pairs, scores = [], []
    skipped = collections.Counter({reason: 0 for reason in SKIP_REASONS})
    for entry in entries:
        everything = ranked(entry, rule.best_of)
        order = distinct(everything, entry)
        if len(order) < 2:
            skipped["identical" if len(everything) >= 2 else "too_few"] += 1
            continue
        chosen, rejected = order[0], _rejected(order, entry, rule)
        if rejected is None:
            skipped["no_such_rank" if rule.rejected == "rank" else "margin"] += 1
            continue
        if entry.scores[chosen] - entry.scores[rejected] < rule.min_margin:
            skipped["margin"] += 1
            continue
        pairs.append(PreferencePair(entry.prompt, entry.responses[chosen],
                                    entry.responses[rejected], source=entry.source))
        scores.append((entry.scores[chosen], entry.scores[rejected]))
    return MadePairs(pairs, scores, dict(skipped))
