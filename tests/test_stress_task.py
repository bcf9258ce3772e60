"""The stress regime of claim 3: the rare-target reward and the measurement of its rarity."""

import jax.numpy as jnp
import numpy as np
import pytest

from experiments import rare_target, stress_refprob
from kljax import rewards, text
from kljax.train import grpo


@pytest.mark.parametrize("completion,expected", [
    ("7777", 1.0), ("777", 0.75), ("7", 0.25), ("", 0.0), ("1777", 0.75), ("7177", 0.75),
    ("12", 0.0), ("77777", 1.0), ("x7x7", 0.5),
])
def test_target_match_counts_matching_positions(completion, expected):
  # TARGET is "7777": the expected value is the hand count of positions i < 4 holding "7".
  assert rare_target.TARGET == "7777"
  assert rare_target.target_match(["1+2="], [completion]) == [expected]


def test_the_stress_config_loads_the_rare_target_reward():
  from configs import grpo_stress

  config = grpo_stress.get_config()
  grpo.validate(config)
  assert rewards.load_reward_fn(config.reward.fns[0]) is rare_target.target_match


def test_target_log_prob_matches_token_by_token_teacher_forcing(sft_dir, data_dir):
  # Independent path: the model run on each unpadded prefix, one next-token log-softmax at a time.
  from kljax import data as data_lib
  from kljax import models

  got = stress_refprob.correct_logprobs(sft_dir, "arithmetic/level1", 8, 4, count=3,
                                        answer="7777", data_dir=data_dir)
  tok, model = text.CharTokenizer(), models.from_hf(sft_dir)
  for ex, value in zip(data_lib.load("arithmetic/level1", "test", data_dir=data_dir).take(range(3)),
                       got):
    seq, total = [tok.bos_id] + tok.encode(ex["question"]), 0.0
    for t in tok.encode("7777"):
      logits = np.asarray(model(jnp.asarray([seq]))[0, -1], np.float64)
      total += logits[t] - np.log(np.sum(np.exp(logits - logits.max()))) - logits.max()
      seq.append(t)
    assert value == pytest.approx(total, abs=1e-4)


def test_a_run_directory_is_reused_only_under_its_own_config(tmp_path):
  # The stress config once scored the arithmetic answer; a directory trained so must not be read
  # back as a run of the rare-target reward.
  from configs import grpo_stress
  from kljax import study

  old = grpo_stress.get_config()
  old.reward.fns = ("numeric_match",)
  study.check_run_config(tmp_path / "fresh", old)  # nothing recorded: passes
  study.record_run_config(tmp_path / "run", old)
  study.check_run_config(tmp_path / "run", old)  # the same config: passes
  with pytest.raises(ValueError, match=r"reward\.fns: \['numeric_match'\] then, "
                                       r"\['experiments\.rare_target:target_match'\] now"):
    study.check_run_config(tmp_path / "run", grpo_stress.get_config())
