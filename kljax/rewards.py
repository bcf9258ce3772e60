"""Verifiable rewards: answer extraction, exact numeric match, format, and user reward functions.

A reward function is called as `reward_fn(prompts, completions, **example_fields) -> [N] floats`
(the example fields are lists aligned with the completions, e.g. `answer=[...]`). User functions are
named in configs by import path, "package.module:function".
"""

from __future__ import annotations

import importlib
import re
from fractions import Fraction
from typing import Callable, NamedTuple, Sequence

import numpy as np

RewardFn = Callable[..., Sequence[float]]

_NUMBER = r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?"
_HASHES = re.compile(r"####\s*\$?\s*(" + _NUMBER + r")")
_NUMBERS = re.compile(_NUMBER)


def _boxed(text: str) -> str | None:
  """Content of the last \\boxed{...}, with nested braces."""
  start = text.rfind("\\boxed{")
  if start < 0:
    return None
  i, depth = start + len("\\boxed{"), 1
  for j in range(i, len(text)):
    depth += {"{": 1, "}": -1}.get(text[j], 0)
    if depth == 0:
      return text[i:j].strip()
  return None


def extract_answer(text: str) -> str | None:
  """The final answer of a solution: `#### 42` (GSM8K), else `\\boxed{42}`, else the last number."""
  m = _HASHES.findall(text)
  if m:
    return m[-1]
  boxed = _boxed(text)
  if boxed is not None:
    return boxed
  numbers = _NUMBERS.findall(text)
  return numbers[-1] if numbers else None


def parse_number(text: str | None) -> Fraction | None:
  """"1,234" -> 1234, "-3.50" -> -7/2, "$12" -> 12, "3/4" -> 3/4; None if not a number."""
  if text is None:
    return None
  s = text.strip().replace(",", "").replace("$", "").replace(" ", "").rstrip(".")
  s = re.sub(r"^\\(?:d?frac)\{(-?\d+)\}\{(-?\d+)\}$", r"\1/\2", s)
  try:
    value = Fraction(s)
  except (ValueError, ZeroDivisionError):
    return None
  return value


def numeric_match(prompts: Sequence[str], completions: Sequence[str], *, answer: Sequence[str],
                  **_) -> list[float]:
  """1.0 where the completion's extracted answer equals the reference numerically, else 0.0."""
  out = []
  for completion, ref in zip(completions, answer, strict=True):
    got, want = parse_number(extract_answer(completion)), parse_number(str(ref))
    out.append(float(got is not None and want is not None and got == want))
  return out


def format_reward(prompts: Sequence[str], completions: Sequence[str], *,
                  pattern: str = r"####\s*" + _NUMBER + r"\s*$", **_) -> list[float]:
  """1.0 where the completion ends with the answer format (default `#### <number>`), else 0.0."""
  rx = re.compile(pattern)
  return [float(rx.search(c.strip()) is not None) for c in completions]


def boxed_format_reward(prompts: Sequence[str], completions: Sequence[str], **_) -> list[float]:
  """1.0 where the completion puts a final answer in \\boxed{...}, else 0.0."""
  return [float(_boxed(c) is not None) for c in completions]


BUILTIN = {"numeric_match": numeric_match, "format": format_reward, "boxed_format": boxed_format_reward}


def load_reward_fn(spec: str | RewardFn) -> RewardFn:
  """A built-in name ("numeric_match", "format"), an import path "pkg.module:function", or a callable."""
  if callable(spec):
    return spec
  if spec in BUILTIN:
    return BUILTIN[spec]
  module_name, sep, attr = str(spec).partition(":")
  if not sep or not module_name or not attr:
    raise ValueError(
        f"reward function {spec!r}: expected a built-in name ({', '.join(BUILTIN)}) or an "
        f"import path 'package.module:function'."
    )
  try:
    module = importlib.import_module(module_name)
  except ImportError as err:
    raise ValueError(f"reward function {spec!r}: cannot import module {module_name!r}: {err}") from err
  fn = getattr(module, attr, None)
  if not callable(fn):
    raise ValueError(f"reward function {spec!r}: module {module_name!r} has no callable {attr!r}.")
  return fn


class RewardError(RuntimeError):
  """A reward function failed on a sample; the message names the function and the sample."""


class Scores(NamedTuple):
  total: np.ndarray  # float32 [N], the weighted sum
  per_fn: dict[str, np.ndarray]  # name -> float32 [N]
  failures: int  # samples scored 0 because a function raised (on_error="zero")


def _name(fn: RewardFn) -> str:
  return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def score(
    reward_fns: Sequence[RewardFn],
    prompts: Sequence[str],
    completions: Sequence[str],
    *,
    weights: Sequence[float] | None = None,
    on_error: str = "raise",
    **example_fields: Sequence,
) -> Scores:
  """Runs every reward function and returns the weighted sum.

  A function that raises stops everything with a `RewardError` naming the function and the first
  sample (`on_error="raise"`), or, with `on_error="zero"`, is re-run sample by sample and the
  samples that raise score 0 and are counted. Non-finite or wrongly sized outputs always raise.
  """
  if on_error not in ("raise", "zero"):
    raise ValueError(f"on_error must be 'raise' or 'zero', got {on_error!r}.")
  n = len(completions)
  if len(prompts) != n or any(len(v) != n for v in example_fields.values()):
    raise ValueError(
        f"prompts ({len(prompts)}), completions ({n}) and every example field "
        f"({ {k: len(v) for k, v in example_fields.items()} }) must have the same length."
    )
  weights = [1.0] * len(reward_fns) if weights is None else list(weights)
  if len(weights) != len(reward_fns):
    raise ValueError(f"{len(weights)} weights for {len(reward_fns)} reward functions.")
  per_fn, failures = {}, 0
  for fn in reward_fns:
    name = _name(fn)
    try:
      values = list(fn(prompts, completions, **example_fields))
    except Exception as err:  # noqa: BLE001 - any user error is reported with its sample
      if on_error == "raise":
        raise RewardError(_describe(name, fn, prompts, completions, example_fields, err)) from err
      values = []
      for i in range(n):
        try:
          values += list(fn(prompts[i:i + 1], completions[i:i + 1],
                            **{k: v[i:i + 1] for k, v in example_fields.items()}))
        except Exception:  # noqa: BLE001
          values.append(0.0)
          failures += 1
    arr = np.asarray(values, np.float32)
    if arr.shape != (n,) or not np.all(np.isfinite(arr)):
      raise RewardError(
          f"reward function {name} returned {arr.shape[0] if arr.ndim else 'a scalar'} values "
          f"(need {n} finite floats); non-finite at {np.flatnonzero(~np.isfinite(arr))[:5].tolist()}."
      )
    per_fn[name] = arr
  total = sum(w * v for w, v in zip(weights, per_fn.values()))
  return Scores(np.asarray(total, np.float32), per_fn, failures)


def _describe(name, fn, prompts, completions, fields, err) -> str:
  """Finds the first sample on which `fn` raises, for the error message."""
  for i in range(len(completions)):
    try:
      fn(prompts[i:i + 1], completions[i:i + 1], **{k: v[i:i + 1] for k, v in fields.items()})
    except Exception as sample_err:  # noqa: BLE001
      return (f"reward function {name} raised {type(sample_err).__name__}: {sample_err} on sample "
              f"{i} (prompt {prompts[i]!r}, completion {completions[i]!r}). Set the config's "
              f"reward on_error='zero' to score such samples 0 and count them.")
  return f"reward function {name} raised {type(err).__name__}: {err} on the batch of {len(completions)}."
