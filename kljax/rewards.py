"""Verifiable rewards: answer extraction, exact numeric match, countdown, format, and user rewards.

A reward function is called as `reward_fn(prompts, completions, **example_fields) -> [N] floats`
(the example fields are lists aligned with the completions, e.g. `answer=[...]`). User functions are
named in configs by import path, "package.module:function".

The built-in verifiers and extractors score any string, in time linear in its length: their regular
expressions cannot backtrack, numbers are parsed exactly or rejected (never cut to a prefix), and
countdown expressions are evaluated without recursion, under a length bound. The optional
`math_verify` reward (Hugging Face's math-verify, `pip install 'kljax[math]'`) parses LaTeX with
sympy instead, under math-verify's own time limit of a few seconds a parse.
"""

from __future__ import annotations

import collections
import importlib
import operator
import re
import threading
from fractions import Fraction
from typing import Callable, NamedTuple, Sequence

import numpy as np

RewardFn = Callable[..., Sequence[float]]

_MAX_DIGITS = 100  # digits of a number, on each side of a fraction bar
_MAX_EXPONENT = 1000  # |e| of a decimal exponent
_MAX_NUMBER_CHARS = 300
_MAX_EXPRESSION_CHARS = 200  # a countdown expression

# A number in a solution's text: ASCII digits, thousands commas in groups of three, a decimal part,
# a decimal exponent, a fraction bar. Possessive quantifiers and an atomic group keep matching linear
# in the text's length; the guards on either side stop a longer token (`1e999999`, `12abc`, `0.5`,
# `1,2345`, `3/4/5`) from being read as one of its prefixes or suffixes.
_NUMBER = (r"(?<![0-9A-Za-z_.,/])-?(?>[0-9]{1,3}(?:,[0-9]{3})++|[0-9]++)(?:\.[0-9]++)?+"
           r"(?:[eE][+-]?[0-9]++)?+(?:/[0-9]++)?+(?![0-9A-Za-z_]|[.,/][0-9])")
_HASHES = re.compile(r"####\s*+(?:\$\s*+)?+(" + _NUMBER + r")")
_NUMBERS = re.compile(_NUMBER)
_PARTS = re.compile(r"(-?)([0-9]{1,3}(?:,[0-9]{3})+|[0-9]+)(?:\.([0-9]+))?(?:[eE]([+-]?[0-9]+))?"
                    r"(?:/([0-9]+))?")
_FRAC = re.compile(r"(-?)\\[dt]?frac\{(-?)([0-9]+)\}\{([0-9]+)\}")


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
  """The final answer of a solution: the last `#### 42` (GSM8K), else the last `\\boxed{42}`, else
  the last number; None if there is none.

  A number is written in ASCII digits (see `parse_number`) and is read whole or not at all:
  `#### 1e999999` gives "1e999999" (which `parse_number` rejects), never "1". Time is linear in
  `len(text)` for any text.
  """
  m = _HASHES.findall(text)
  if m:
    return m[-1]
  boxed = _boxed(text)
  if boxed is not None:
    return boxed
  last = None
  for last in _NUMBERS.finditer(text):
    pass
  return last.group() if last else None


def parse_number(text: str | None) -> Fraction | None:
  """The exact value of a final answer, or None if it is not a number.

  "1,234" → 1234, "-3.50" → −7/2, "$12" → 12, "3/4" and "\\frac{3}{4}" → 3/4, "2.5e-3" → 1/400,
  "1e400" → 10⁴⁰⁰ (exactly; no float is involved). None for anything else, and in particular for
  more than 100 digits (on either side of a fraction bar), a decimal exponent beyond ±1000, a zero
  denominator, commas that do not separate thousands ("1,2"), inner spaces ("1 2"), and digits other
  than ASCII 0-9: "٣" (Arabic-Indic) and "３" (fullwidth) are not read as 3, so each number has one
  spelling and none can score by changing script.
  """
  if text is None or len(text) > _MAX_NUMBER_CHARS:
    return None
  s = text.strip().strip("$").strip().rstrip(".")
  if s.startswith("\\$"):  # an escaped LaTeX dollar sign
    s = s[2:].lstrip()
  frac = _FRAC.fullmatch(s)
  if frac:
    outer, inner, num, den = frac.groups()
    s = f"{'-' if (outer == '-') != (inner == '-') else ''}{num}/{den}"
  m = _PARTS.fullmatch(s)
  if m is None:
    return None
  sign, whole, decimals, exponent, denominator = m.groups()
  digits = whole.replace(",", "") + (decimals or "")
  if len(digits) > _MAX_DIGITS or (denominator and len(denominator) > _MAX_DIGITS):
    return None
  if exponent and (len(exponent) > 6 or abs(int(exponent)) > _MAX_EXPONENT):
    return None
  value = Fraction(int(digits), 10 ** len(decimals or "")) * Fraction(10) ** int(exponent or 0)
  if denominator is not None:
    if int(denominator) == 0:
      return None
    value /= int(denominator)
  return -value if sign else value


def numeric_match(prompts: Sequence[str], completions: Sequence[str], *, answer: Sequence[str],
                  **_) -> list[float]:
  """1.0 where the completion's final answer (`extract_answer`) equals the reference `answer`
  exactly as numbers (`parse_number`), else 0.0."""
  out = []
  for completion, ref in zip(completions, answer, strict=True):
    got, want = parse_number(extract_answer(completion)), parse_number(str(ref))
    out.append(float(got is not None and want is not None and got == want))
  return out


# ---------------------------------------------------------------- countdown

_PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}
_APPLY = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}
_SPELLINGS = {"−": "-", "×": "*", "÷": "/"}


def evaluate_expression(expr: str) -> tuple[Fraction, list[int]] | None:
  """Exact value of an arithmetic expression, and the numbers it uses (in order); None if it is not
  one, or divides by zero.

  Grammar: non-negative integers in ASCII digits without leading zeros, the binary operators
  + − × ÷ (also `-`, `*`, `/`) with the usual precedence and left associativity, parentheses and
  spaces; no unary signs, at most 200 characters. Evaluated by an iterative shunting-yard pass over
  `Fraction`s: no recursion, no float rounding, and, with the length bound, every intermediate
  value has at most about 200 digits, so any string is answered in bounded time.
  """
  if not isinstance(expr, str) or len(expr) > _MAX_EXPRESSION_CHARS:
    return None
  values: list[Fraction] = []
  ops: list[str] = []  # operators and "(" awaiting their right operands
  used: list[int] = []

  def reduce() -> bool:  # applies the operator on top of `ops`; False on division by zero
    op, right = ops.pop(), values.pop()
    if op == "/" and right == 0:
      return False
    values.append(_APPLY[op](values.pop(), right))
    return True

  expect_operand, i, n = True, 0, len(expr)
  while i < n:
    ch = _SPELLINGS.get(expr[i], expr[i])
    if ch in " \t":
      i += 1
    elif expect_operand and "0" <= ch <= "9":
      j = i
      while j < n and "0" <= expr[j] <= "9":
        j += 1
      if expr[i] == "0" and j - i > 1:
        return None  # leading zero
      used.append(int(expr[i:j]))
      values.append(Fraction(used[-1]))
      expect_operand, i = False, j
    elif expect_operand and ch == "(":
      ops.append("(")
      i += 1
    elif not expect_operand and ch in _PRECEDENCE:
      while ops and ops[-1] != "(" and _PRECEDENCE[ops[-1]] >= _PRECEDENCE[ch]:
        if not reduce():
          return None
      ops.append(ch)
      expect_operand, i = True, i + 1
    elif not expect_operand and ch == ")":
      while ops and ops[-1] != "(":
        if not reduce():
          return None
      if not ops:
        return None  # unbalanced ")"
      ops.pop()
      i += 1
    else:
      return None
  if expect_operand:
    return None  # empty, or ends with an operator or "("
  while ops:
    if ops[-1] == "(" or not reduce():
      return None
  return values[0], used


def countdown_check(expression: str, numbers: Sequence[int], target: int) -> bool:
  """True iff `expression` (see `evaluate_expression`) equals `target` and uses each of `numbers`
  at most once (a number given twice may be used twice)."""
  out = evaluate_expression(expression)
  return out is not None and out[0] == target and _draws_from(out[1], numbers)


def _draws_from(used: Sequence[int], numbers: Sequence[int]) -> bool:
  """Each number of `used` is one of `numbers`, taken at most as often as it is given."""
  return not collections.Counter(used) - collections.Counter(numbers)


def countdown_reward(prompts: Sequence[str], completions: Sequence[str], *, numbers: Sequence[str],
                     target: Sequence[str], **_) -> list[float]:
  """1.0 where the completion's final expression makes the target, else 0.0.

  The final expression is the completion's last non-empty line, written `EXPR` or `EXPR = target`
  (for "use 3 4 5 to make 35:", `(3+4)*5`, `5*(4+3)` and `(3+4)*5 = 35` all score 1). It scores 1
  when EXPR (`evaluate_expression`) equals the target exactly and uses each given number at most
  once. Everything else scores 0: a bare number (the target itself, or a given number: at least one
  operator is needed), an equation whose right side is not the target (`35 = 5*7`, `… = 35 = 5*7`),
  a number reused or not given, any other text on the line.

  `numbers` holds each example's numbers space-separated ("3 4 5") and `target` an integer ("35"),
  as in the `countdown/nK` datasets.
  """
  out = []
  for completion, nums, goal in zip(completions, numbers, target, strict=True):
    try:
      pool, want = [int(x) for x in str(nums).split()], int(str(goal))
    except ValueError:
      raise ValueError(f"countdown reward: the example fields must hold integers, e.g. "
                       f"numbers='3 4 5', target='35'; got numbers={nums!r}, target={goal!r}.") from None
    expr, eq, claim = completion.rstrip().rpartition("\n")[2].partition("=")
    parsed = evaluate_expression(expr) if not eq or claim.strip() == str(want) else None
    out.append(float(parsed is not None and len(parsed[1]) >= 2 and parsed[0] == want
                     and _draws_from(parsed[1], pool)))
  return out


# ---------------------------------------------------------------- format


def format_reward(prompts: Sequence[str], completions: Sequence[str], *,
                  pattern: str = r"####\s*+" + _NUMBER + r"\s*+$", **_) -> list[float]:
  """1.0 where the completion ends with the answer format (default `#### <number>`), else 0.0."""
  rx = re.compile(pattern)
  return [float(rx.search(c.strip()) is not None) for c in completions]


def boxed_format_reward(prompts: Sequence[str], completions: Sequence[str], **_) -> list[float]:
  """1.0 where the completion puts a final answer in \\boxed{...}, else 0.0."""
  return [float(_boxed(c) is not None) for c in completions]


# ---------------------------------------------------------------- math-verify (optional)

MATH_VERIFY_MISSING = ("the reward 'math_verify' needs the math-verify package, which is not "
                       "installed: pip install 'kljax[math]' (or pip install math-verify).")


def _math_verify():
  try:
    import math_verify
  except ImportError:
    raise ValueError(MATH_VERIFY_MISSING) from None
  return math_verify


MATH_VERIFY_TAIL = 1000  # characters of a completion that math_verify_reward parses at most


def _answer_tail(completion: str) -> str:
  """The part of `completion` holding its final answer: from its last `\\boxed` (else its last
  MATH_VERIFY_TAIL characters), cut to MATH_VERIFY_TAIL characters."""
  start = completion.rfind("\\boxed")
  tail = completion[start:] if start >= 0 else completion[-MATH_VERIFY_TAIL:]
  return tail[:MATH_VERIFY_TAIL]


def math_verify_reward(prompts: Sequence[str], completions: Sequence[str], *,
                       answer: Sequence[str], **_) -> list[float]:
  """1.0 where math-verify judges the completion's final answer mathematically equal to the
  reference `answer`, else 0.0.

  math-verify (Hugging Face; the verifier of Open-R1 and its OpenR1-Math-220k filtering) extracts
  the last `\\boxed{…}` or LaTeX/plain expression of the completion and compares it with sympy:
  `\\boxed{\\frac{1}{2}}` and `0.5`, `\\dfrac12`, `50\\%` are equal, as are intervals such as
  `[1, 3)`, which `numeric_match` cannot read. A reference without `$` or `\\boxed` is read as
  one LaTeX expression. Needs `pip install 'kljax[math]'`; its time limit uses `signal.alarm`, so
  off the main thread it runs without one. Only the completion's tail is parsed — from its last
  `\\boxed`, else its last `MATH_VERIFY_TAIL` characters, at most that many either way — since
  the final answer is all math-verify reads and its parser is slow on long inputs (a 350,000-
  character nest of `\\boxed` took 4.9 s whole).
  """
  mv = _math_verify()
  limit = 5 if threading.current_thread() is threading.main_thread() else None
  out = []
  for completion, ref in zip(completions, answer, strict=True):
    ref = str(ref)
    gold = mv.parse(ref if "$" in ref or "\\boxed" in ref else f"${ref}$", parsing_timeout=limit)
    got = mv.parse(_answer_tail(completion), parsing_timeout=limit)
    out.append(float(bool(gold) and bool(got) and mv.verify(gold, got, timeout_seconds=limit)))
  return out


BUILTIN = {"numeric_match": numeric_match, "countdown": countdown_reward, "format": format_reward,
           "boxed_format": boxed_format_reward, "math_verify": math_verify_reward}
# Built-in rewards that need an optional package: a check that raises ValueError naming its extra.
OPTIONAL = {"math_verify": _math_verify}

# The example fields each built-in reward reads, with the kind of value it needs in each. A dataset
# (`kljax.data.builders.FIELDS`) can be scored by a reward when it has every one of those fields in
# that kind: `numeric_match` on countdown, whose `answer` is an expression, would score 0 always.
EXAMPLE_FIELDS = {"numeric_match": {"answer": "number"}, "math_verify": {"answer": "number"},
                  "countdown": {"numbers": "integers", "target": "integer"},
                  "format": {}, "boxed_format": {}}


def load_reward_fn(spec: str | RewardFn) -> RewardFn:
  """A built-in name (a key of `BUILTIN`), an import path "pkg.module:function", or a callable."""
  if callable(spec):
    return spec
  if spec in BUILTIN:
    if spec in OPTIONAL:
      OPTIONAL[spec]()  # its package is installed, or ValueError naming the extra
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
    timeout_s: float = 0.0,
    **example_fields: Sequence,
) -> Scores:
  """Runs every reward function and returns the weighted sum.

  A function that raises stops everything with a `RewardError` naming the function and the first
  sample (`on_error="raise"`), or, with `on_error="zero"`, is re-run sample by sample and the
  samples that raise score 0 and are counted. An output that is not N finite numbers (strings,
  None, a scalar, NaN, another length) always raises a RewardError. With `timeout_s` > 0, a call
  that has not returned after that many seconds raises a RewardError naming the function (the call
  is left running on a daemon thread: Python cannot stop it, and it cannot keep the process up).
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
    call = lambda *a, **k: _call(fn, name, timeout_s, len(a[1]), *a, **k)  # noqa: E731
    try:
      values = call(prompts, completions, **example_fields)
    except RewardError:
      raise
    except Exception as err:  # noqa: BLE001 - any user error is reported with its sample
      if on_error == "raise":
        raise RewardError(_describe(name, fn, prompts, completions, example_fields, err)) from err
      values = []
      for i in range(n):
        try:
          values.append(_floats(name, call(prompts[i:i + 1], completions[i:i + 1],
                                           **{k: v[i:i + 1] for k, v in example_fields.items()}),
                                1)[0])
        except RewardError:
          raise
        except Exception:  # noqa: BLE001
          values.append(0.0)
          failures += 1
    per_fn[name] = _floats(name, values, n)
  total = sum(w * v for w, v in zip(weights, per_fn.values()))
  return Scores(np.asarray(total, np.float32), per_fn, failures)


def _call(fn, name: str, timeout_s: float, n: int, *args, **kwargs):
  """fn(*args, **kwargs), on a daemon thread when `timeout_s` > 0, RewardError past it."""
  if not timeout_s:
    return fn(*args, **kwargs)
  box: dict = {}

  def run():
    try:
      box["out"] = fn(*args, **kwargs)
    except BaseException as err:  # noqa: BLE001 - handed to the caller's thread
      box["err"] = err

  worker = threading.Thread(target=run, name=f"kljax-reward-{name}", daemon=True)
  worker.start()
  worker.join(timeout_s)
  if worker.is_alive():
    raise RewardError(f"reward function {name} did not return within reward.timeout_s="
                      f"{timeout_s:g} s on a batch of {n}; make it faster, or raise "
                      f"--config.reward.timeout_s (0: no limit).")
  if "err" in box:
    raise box["err"]
  return box["out"]


def _floats(name: str, values, n: int) -> np.ndarray:
  """`values` as [n] finite float32, or a RewardError saying what the function returned."""
  def wrong(what: str) -> RewardError:
    return RewardError(f"reward function {name} returned {what}; it must return {n} finite "
                       f"numbers (one for each completion).")

  if isinstance(values, (str, bytes)) or np.isscalar(values) or values is None:
    raise wrong(f"{type(values).__name__} {values!r:.60}")
  try:
    values = list(values)
  except TypeError:
    raise wrong(f"a {type(values).__name__}, not a sequence") from None
  bad = [v for v in values if isinstance(v, (str, bytes, bool))
         or not (np.isscalar(v) or getattr(v, "ndim", None) == 0)]
  if bad:
    raise wrong(f"a {type(bad[0]).__name__} ({bad[0]!r:.60}) among its values")
  arr = np.asarray(values, np.float32)
  if arr.shape != (n,):
    raise wrong(f"{arr.shape[0] if arr.ndim else 'a scalar'} values")
  if not np.all(np.isfinite(arr)):
    raise wrong(f"non-finite values at {np.flatnonzero(~np.isfinite(arr))[:5].tolist()}")
  return arr


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
