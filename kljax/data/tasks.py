"""Procedural verifiable tasks: multi-digit arithmetic and countdown. Deterministic by seed.

Every example is a dict of strings: `question` (the prompt text), `answer` (a reference answer) and
task fields. Texts use only characters of `kljax.text.CharTokenizer`'s default alphabet.

References:
  Countdown as an RL task: Pan et al., "TinyZero" (2025); Gandhi et al., arXiv:2503.01307 (2025).
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

# The countdown verifier lives with the rewards (kljax.rewards), which score completions with it.
from kljax.rewards import countdown_check, evaluate_expression  # noqa: F401

ARITHMETIC_LEVELS = (1, 2, 3, 4, 5)


def arithmetic_example(rng: np.random.Generator, level: int) -> dict[str, str]:
  """Level L: two operands of up to L digits; + and − from level 1, × from level 3 (one factor ≤ 2
  digits)."""
  if level not in ARITHMETIC_LEVELS:
    raise ValueError(f"level must be one of {ARITHMETIC_LEVELS}, got {level}.")
  ops = "+-" if level < 3 else "+-*"
  op = ops[rng.integers(len(ops))]
  hi = 10**level
  a = int(rng.integers(0, hi))
  b = int(rng.integers(0, hi if op != "*" else min(hi, 100)))
  value = {"+": a + b, "-": a - b, "*": a * b}[op]
  return {"question": f"{a}{op}{b}=", "answer": str(value), "level": str(level)}


def arithmetic(seed: int, count: int, level: int) -> Iterator[dict[str, str]]:
  rng = np.random.default_rng(seed)
  for _ in range(count):
    yield arithmetic_example(rng, level)


def countdown_example(rng: np.random.Generator, num_numbers: int) -> dict[str, str]:
  """Numbers in [1, 20]; the target is the value of a random + − × combination of all of them,
  so every example is solvable (the reference solution is stored)."""
  if not 2 <= num_numbers <= 5:
    raise ValueError(f"num_numbers must be in [2, 5], got {num_numbers}.")
  while True:
    numbers = [int(x) for x in rng.integers(1, 21, num_numbers)]
    order = [int(i) for i in rng.permutation(num_numbers)]
    expr = str(numbers[order[0]])
    for i in order[1:]:
      op = "+-*"[rng.integers(3)]
      expr = f"({expr}){op}{numbers[i]}" if op == "*" else f"{expr}{op}{numbers[i]}"
    value = evaluate_expression(expr)[0]
    if value.denominator == 1 and 0 < value <= 1000:
      break
  target = int(value)
  nums = " ".join(map(str, numbers))
  return {"question": f"use {nums} to make {target}:", "answer": expr,
          "numbers": nums, "target": str(target)}


def countdown(seed: int, count: int, num_numbers: int) -> Iterator[dict[str, str]]:
  rng = np.random.default_rng(seed)
  for _ in range(count):
    yield countdown_example(rng, num_numbers)
