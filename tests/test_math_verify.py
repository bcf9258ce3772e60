"""The optional `math_verify` reward: answers whose equality is mathematical, not textual.

Each expected score is the mathematical truth of "the completion's final answer equals the
reference", written by hand beside the case; the cases where it is 1 are ones `numeric_match` (an
exact rational reader of plain numbers) scores 0.
"""

import sys

import pytest

from kljax import rewards

# (reference answer, completion, whether the final answer equals the reference)
EQUAL_BUT_NOT_A_PLAIN_NUMBER = [
    ("0.5", r"The answer is \boxed{\dfrac12}", "1/2 = 0.5 (\\dfrac with bare digits)"),
    ("[1, 3)", r"The solution set is \boxed{[1,3)}", "the same half-open interval"),
    (r"\frac{\sqrt{2}}{2}", r"So \boxed{\frac{1}{\sqrt{2}}}", "1/√2 = √2/2"),
    ("0.5", r"\boxed{50\%}", "50% = 0.5"),
    ("0.25", r"\boxed{\left(\frac{1}{2}\right)^2}", "(1/2)² = 1/4"),
    ("1000", r"\boxed{10^3}", "10³ = 1000"),
    ("3", r"\boxed{x = 3}", "the solution x = 3"),
]
NOT_EQUAL = [
    ("[1, 3)", r"\boxed{(1, 3)}", "(1, 3) leaves out 1"),
    ("0.5", r"\boxed{\frac{1}{3}}", "1/3 ≠ 1/2"),
    (r"\frac{\sqrt{2}}{2}", r"\boxed{\sqrt{2}}", "√2 ≠ √2/2"),
    ("1000", r"\boxed{10^4}", "10⁴ ≠ 10³"),
]


@pytest.mark.parametrize("answer,completion,why", EQUAL_BUT_NOT_A_PLAIN_NUMBER)
def test_math_verify_scores_equal_answers_that_numeric_match_misses(answer, completion, why):
  assert rewards.numeric_match([""], [completion], answer=[answer]) == [0.0], why
  assert rewards.math_verify_reward([""], [completion], answer=[answer]) == [1.0], why


@pytest.mark.parametrize("answer,completion,why", NOT_EQUAL)
def test_math_verify_scores_unequal_answers_zero(answer, completion, why):
  assert rewards.math_verify_reward([""], [completion], answer=[answer]) == [0.0], why


def test_math_verify_agrees_with_numeric_match_on_plain_numbers():
  # \boxed{\frac{1}{2}} vs 0.5 and #### answers: both readers get these right (truth: 1, 1, 0).
  answers = ["0.5", r"\frac{1}{2}", "42"]
  completions = [r"\boxed{\frac{1}{2}}", "#### 0.5", "#### 41"]
  want = [1.0, 1.0, 0.0]
  assert rewards.numeric_match([""] * 3, completions, answer=answers) == want
  assert rewards.math_verify_reward([""] * 3, completions, answer=answers) == want


def test_math_verify_by_name_scores_through_score():
  fn = rewards.load_reward_fn("math_verify")
  out = rewards.score([fn], ["q", "q"], [r"\boxed{\dfrac12}", r"\boxed{2}"], answer=["0.5", "0.5"])
  assert out.total.tolist() == [1.0, 0.0]


def test_math_verify_missing_names_the_extra(monkeypatch):
  monkeypatch.setitem(sys.modules, "math_verify", None)  # `import math_verify` raises ImportError
  with pytest.raises(ValueError, match=r"kljax\[math\]"):
    rewards.load_reward_fn("math_verify")
  from kljax.train import config as config_lib, grpo

  c = config_lib.grpo_tiny()
  c.reward.fns = ("math_verify",)
  with pytest.raises(grpo.ConfigError, match=r"--config.reward.fns: .*pip install 'kljax\[math\]'"):
    grpo.validate(c)


def test_math_verify_fits_the_number_datasets():
  from kljax.train import config as config_lib, grpo

  c = config_lib.grpo_tiny()
  c.reward.fns = ("math_verify",)
  grpo.validate(c)  # arithmetic's answers are numbers
  c.data.name, c.data.max_prompt_len = "countdown/n3", 27
  with pytest.raises(grpo.ConfigError, match="math_verify"):
    grpo.validate(c)  # countdown's answer is an expression to build, not a value


def test_math_verify_reads_the_final_answer_of_long_completions():
  # Only the tail is parsed (from the last \boxed, at most MATH_VERIFY_TAIL characters): a long
  # preamble or a long afterword around the boxed answer changes nothing.
  n = 5 * rewards.MATH_VERIFY_TAIL
  long_before = "Let us think. " * n + r"So the answer is $\boxed{\frac{1}{2}}$."
  long_after = r"The answer is $\boxed{3}$. " + "I double-checked it. " * n
  assert rewards.math_verify_reward(["q"] * 2, [long_before, long_after], answer=["0.5", "3"]) == [
      1.0, 1.0]
  assert rewards.math_verify_reward(["q"], [long_before], answer=["0.25"]) == [0.0]
