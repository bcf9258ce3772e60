"""Verifiable rewards: exact numbers, the countdown verifier and reward, known reward hacks, the
reward/dataset check, and every built-in reward and extractor fuzzed with random and adversarial
strings under a time bound per call.

Expected values are derived by hand, or (for expressions) from the expression tree a test builds.
"""

import gc
import time
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kljax import rewards
from kljax.train import grpo
from kljax.train.config import grpo_tiny

# CPU seconds per call, for any string. The bound is for hangs, not speed: a super-linear parser
# takes seconds on the long strings below (`####` + 20,000 spaces took 4 s in a backtracking regex),
# a linear one a few hundredths. CPU time, with the collector paused during the call, so that
# neither a loaded shared machine nor a full collection of the suite's heap reads as a hang (CI once
# measured a 0.04 s call at 1.48 s wall, twice, late in the suite).
TIME_LIMIT_S = 0.5
# Fields for every built-in reward at once (each ignores the ones it does not read).
FIELDS = {"answer": ["35"], "numbers": ["3 4 5"], "target": ["35"]}


@pytest.fixture(scope="module", autouse=True)
def _imported():
  """Each reward called once before any is timed: math-verify imports sympy on its first parse."""
  for fn in rewards.BUILTIN.values():
    fn(["q"], ["#### 35"], **FIELDS)


def _timed(fn, text, *args, **kwargs):
  """fn(*args, **kwargs), asserting it returns within TIME_LIMIT_S of CPU time. A slow call is
  timed once more, so that a hiccup is not mistaken for a hang."""
  for _ in range(2):
    gc.disable()
    try:
      start = time.process_time()
      out = fn(*args, **kwargs)
      elapsed = time.process_time() - start
    finally:
      gc.enable()
    if elapsed < TIME_LIMIT_S:
      return out
  raise AssertionError(f"{fn.__name__} took {elapsed:.3f} CPU s (twice) on a string of "
                       f"{len(text or '')} characters: {(text or '')[:60]!r}…")


def _scores_any_string(text: str) -> None:
  for name, fn in rewards.BUILTIN.items():
    out = _timed(fn, text, ["q"], [text], **FIELDS)
    assert list(out) in ([0.0], [1.0]), (name, out)
  answer = _timed(rewards.extract_answer, text, text)
  assert answer is None or isinstance(answer, str)
  for s in (text, answer):
    value = _timed(rewards.parse_number, s, s)
    assert value is None or isinstance(value, Fraction)
  out = _timed(rewards.evaluate_expression, text, text)
  assert out is None or (isinstance(out[0], Fraction) and all(isinstance(n, int) for n in out[1]))


PIECES = ["####", "#### ", "\\boxed{", "{", "}", "\\frac{", "\\dfrac", "$", "\\$", "(", ")", "=",
          "\n", "\r", " ", "\t", "\x00", "\u2028", "-", "+", "*", "/", "×", "÷", "−", ".", ",",
          "e", "E", "e+", "e-", "0", "1", "3", "4", "5", "7", "9", "35", "٣", "３", "𝟕", "1e999999",
          "9" * 60, "1,234", "2*", "(3+4)*5"]
adversarial = st.lists(st.tuples(st.sampled_from(PIECES), st.integers(1, 4)), max_size=60).map(
    lambda parts: "".join(piece * k for piece, k in parts))
# One or two pieces repeated thousands of times: the shapes that make a backtracking regex or a
# recursive parser quadratic or deep.
long_adversarial = st.tuples(st.sampled_from(PIECES + [""]), st.sampled_from(PIECES),
                             st.sampled_from(PIECES + [""]), st.integers(1_000, 20_000),
                             st.sampled_from(PIECES + [""])
                             ).map(lambda t: t[0] + (t[1] + t[2]) * t[3] + t[4])


@settings(deadline=None, max_examples=400)
@given(st.text(max_size=300))
def test_any_unicode_string_gets_a_score(text):
  _scores_any_string(text)


@settings(deadline=None, max_examples=400)
@given(adversarial)
def test_adversarial_strings_get_a_score(text):
  _scores_any_string(text)


@settings(deadline=None, max_examples=60)
@given(long_adversarial)
def test_long_repetitive_strings_get_a_score_fast(text):
  _scores_any_string(text)


@pytest.mark.parametrize("text", [
    "*".join(["2"] * 3000),  # RecursionError in an `ast`-based evaluator
    "(" * 100_000 + "1" + ")" * 100_000,
    "####" + " " * 20_000 + "x",  # quadratic in `####\s*\$?\s*`: 4 s
    "####" + " " * 200_000 + "7",
    "1" * 1_000_000,
    "1e" + "9" * 100_000,
    "\\boxed{" * 50_000,
    "\x00" * 100_000,
    "٣" * 100_000,
])
def test_known_slow_or_crashing_inputs(text):
  _scores_any_string(text)


# ---------------------------------------------------------------- exact numbers


@pytest.mark.parametrize("text,value", [
    ("1e400", Fraction(10**400)),  # beyond float range, exactly
    ("1e1000", Fraction(10**1000)),
    ("2.5e-3", Fraction(1, 400)),
    ("-1.25E+2", Fraction(-125)),
    ("1,234,567.5", Fraction(2469135, 2)),
    ("7/2", Fraction(7, 2)),
    ("\\frac{3}{4}", Fraction(3, 4)),
    ("-\\dfrac{3}{4}", Fraction(-3, 4)),
    ("\\frac{-3}{4}", Fraction(-3, 4)),
    ("$12", Fraction(12)),
    ("12.", Fraction(12)),
    ("1" * 100, Fraction(int("1" * 100))),
])
def test_parse_number_is_exact(text, value):
  assert rewards.parse_number(text) == value


@pytest.mark.parametrize("text", [
    "1e1001", "1e-1001", "1e999999", "1" * 101, "1/" + "1" * 101, "3/0", "1,2", "1,2345", "1 2",
    "٣", "３", "𝟕", "0x10", "1_000", "nan", "inf", "", "-", "1e", ".5",
])
def test_parse_number_rejects(text):
  assert rewards.parse_number(text) is None


@pytest.mark.parametrize("completion,answer,score", [
    ("#### 1e999999", "1", 0.0),  # was read as 1
    ("#### 1e3", "1000", 1.0),
    ("#### 1e400", "1e400", 1.0),
    ("#### 1e400", "1e401", 0.0),
    ("#### ٣", "3", 0.0),  # non-ASCII digits are not numbers
    ("#### ３", "3", 0.0),
    ("so it is 0.5", "1/2", 1.0),
    ("\\boxed{1,234}", "1234", 1.0),
    ("\\boxed{1,2}", "12", 0.0),
    ("#### 12abc", "12", 0.0),  # not a number, and not its prefix either
])
def test_numeric_match_reads_numbers_whole(completion, answer, score):
  assert rewards.numeric_match(["q"], [completion], answer=[answer]) == [score]


def test_extract_answer_never_returns_part_of_a_number():
  assert rewards.extract_answer("#### 1e999999") == "1e999999"
  assert rewards.extract_answer("values 0.5 and 3/4/5") == "0.5"
  assert rewards.extract_answer("x = -5") == "-5"
  assert rewards.extract_answer("#### ٣ and ３") is None


# ---------------------------------------------------------------- countdown


PREC = {"+": 1, "-": 1, "*": 2, "/": 2}


def _value(tree):
  if isinstance(tree, int):
    return Fraction(tree)
  op, left, right = tree
  a, b = _value(left), _value(right)
  if op == "/":
    if b == 0:
      raise ZeroDivisionError
    return a / b
  return {"+": a + b, "-": a - b, "*": a * b}[op]


def _render(tree, space):
  """The expression with only the parentheses precedence needs (left-associative operators)."""
  if isinstance(tree, int):
    return str(tree)
  op, left, right = tree
  ls, rs = _render(left, space), _render(right, space)
  if not isinstance(left, int) and PREC[left[0]] < PREC[op]:
    ls = f"({ls})"
  if not isinstance(right, int) and PREC[right[0]] <= PREC[op]:
    rs = f"({rs})"
  return f"{ls}{space}{op}{space}{rs}"


def _leaves(tree):
  return [tree] if isinstance(tree, int) else _leaves(tree[1]) + _leaves(tree[2])


trees = st.recursive(st.integers(0, 50),
                     lambda kids: st.tuples(st.sampled_from("+-*/"), kids, kids), max_leaves=10)


@settings(deadline=None, max_examples=300)
@given(trees, st.sampled_from(["", " "]))
def test_evaluate_expression_matches_the_tree(tree, space):
  text = _render(tree, space)
  try:
    want = (_value(tree), _leaves(tree))
  except ZeroDivisionError:
    want = None
  assert rewards.evaluate_expression(text) == want, text


def test_evaluate_expression_grammar():
  assert rewards.evaluate_expression("2-3-4") == (Fraction(-5), [2, 3, 4])  # left-associative
  assert rewards.evaluate_expression("8/2/2") == (Fraction(2), [8, 2, 2])
  assert rewards.evaluate_expression("2+3*4") == (Fraction(14), [2, 3, 4])
  assert rewards.evaluate_expression("1/3*3") == (Fraction(1), [1, 3, 3])  # exact, not 0.999…
  assert rewards.evaluate_expression("(3 + 4) × 5") == (Fraction(35), [3, 4, 5])
  for bad in ["", "-3+5", "+3", "3+", "(3+4", "3+4)", "()", "3 4", "03+1", "3**2", "3^2", "5/0",
              "5/(2-2)", "__import__('os')", "٣+4", "1" * 201]:
    assert rewards.evaluate_expression(bad) is None, bad


PROMPT = {"numbers": ["3 4 5"], "target": ["35"]}  # "use 3 4 5 to make 35:"


@pytest.mark.parametrize("completion,score", [
    ("(3+4)*5", 1.0),
    ("5*(4+3)", 1.0),
    ("(3 + 4) × 5", 1.0),
    ("(3+4)*5 = 35", 1.0),
    ("let me think\n3+4 = 7\n(3+4)*5\n", 1.0),  # the last non-empty line
    ("4*5", 0.0),  # 20
    ("(3+4)*5 = 36", 0.0),  # a wrong right-hand side
    ("35 = (3+4)*5", 0.0),  # the expression comes first
    ("the answer is (3+4)*5", 0.0),
])
def test_countdown_reward(completion, score):
  assert rewards.load_reward_fn("countdown")(["q"], [completion], **PROMPT) == [score]


def test_countdown_uses_each_number_at_most_once_and_not_all():
  score = lambda c, nums, target: rewards.countdown_reward(["q"], [c], numbers=[nums],
                                                           target=[target])[0]
  assert score("(7+19)*7", "7 7 19", "182") == 1.0  # 7 is given twice
  assert score("4*5", "3 4 5", "20") == 1.0  # not every number is needed
  assert score("8/2+1", "8 2 1", "5") == 1.0
  assert score("5/(4-4)", "4 4 5", "5") == 0.0  # division by zero scores 0, no exception
  assert rewards.load_reward_fn("kljax.rewards:countdown_reward") is rewards.countdown_reward
  with pytest.raises(ValueError, match=r"countdown reward: .*got numbers='3 four', target='35'"):
    score("3+4", "3 four", "35")


# Known reward hacks and the score each must get: (reward, fields, completion, score).
HACKS = [
    ("only the target", "countdown", PROMPT, "35", 0.0),
    ("the target as an equation", "countdown", PROMPT, "35 = 35", 0.0),
    ("a given number equal to the target", "countdown", {"numbers": ["5 1 1"], "target": ["5"]},
     "5", 0.0),
    ("an expression that reuses a number", "countdown", PROMPT, "5*(5+4-3)+5", 0.0),
    ("a number not given", "countdown", PROMPT, "5*7", 0.0),
    ("padding with a number not given", "countdown", PROMPT, "(3+4)*5*1", 0.0),
    ("the answer in several forms", "countdown", PROMPT, "(3+4)*5 = 35 = 5*7", 0.0),
    ("a right expression, then a wrong one", "countdown", PROMPT, "(3+4)*5\n3*4*5", 0.0),
    ("the answer repeated in several formats", "numeric_match", {"answer": ["35"]},
     "#### 35 = 35.0 = 70/2", 1.0),  # all the right answer: the first after #### counts
    ("several candidates, the right one not last", "numeric_match", {"answer": ["35"]},
     "\\boxed{35} or \\boxed{36}", 0.0),
    ("several candidates in one box", "numeric_match", {"answer": ["35"]},
     "\\boxed{34, 35, 36}", 0.0),
    ("a huge exponent read as its prefix", "numeric_match", {"answer": ["1"]}, "#### 1e999999", 0.0),
    ("other scripts' digits", "numeric_match", {"answer": ["35"]}, "#### ３５", 0.0),
    ("the format alone", "format", {}, "#### 1e999999", 1.0),  # format checks the format only
]


@pytest.mark.parametrize("name,reward,fields,completion,score", HACKS, ids=[h[0] for h in HACKS])
def test_known_reward_hacks(name, reward, fields, completion, score):
  assert rewards.load_reward_fn(reward)(["q"], [completion], **fields) == [score]


# ---------------------------------------------------------------- rewards × datasets


def _config(dataset, fns):
  c = grpo_tiny()
  c.data.name, c.reward.fns, c.mesh.devices = dataset, tuple(fns.split(",")), 1
  c.reward.weights = (1.0,) * len(c.reward.fns)  # one weight per function
  return c


@pytest.mark.parametrize("dataset,fns,match", [
    ("countdown/n3", "numeric_match",
     r"--config.reward.fns: the reward 'numeric_match' cannot score the dataset 'countdown/n3': "
     r"it reads the example fields answer \(number\), and countdown/n3 has answer \(expression\). "
     r"Rewards that check countdown/n3: countdown."),
    ("arithmetic/level1", "countdown",
     r"'countdown' cannot score the dataset 'arithmetic/level1': .*numbers \(missing\), target "
     r"\(missing\). Rewards that check arithmetic/level1: numeric_match."),
    ("gsm8k", "numeric_match, countdown", r"'countdown' cannot score the dataset 'gsm8k'"),
])
def test_validate_rejects_a_reward_that_cannot_score_the_dataset(dataset, fns, match):
  with pytest.raises(grpo.ConfigError, match=match):
    grpo.validate(_config(dataset, fns))


@pytest.mark.parametrize("dataset,fns", [
    ("countdown/n4", "countdown,format"), ("openr1_math", "numeric_match,boxed_format"),
    ("countdown/n3", "kljax.rewards:countdown_reward"),  # import paths are not checked
])
def test_validate_accepts_rewards_that_fit(dataset, fns):
  grpo.validate(_config(dataset, fns))
