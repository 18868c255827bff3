"""Xwin-Pair: sample responses, judge pairs (GPT-4 or the rule judge), write preference pairs."""
