"""The SFT warm start takes its lengths from the GRPO config and refuses, before any training, data
that would leave an example nothing to learn; a countdown run scores with the countdown reward."""

import importlib.util
import os

import numpy as np
import pytest

from kljax import data, text
from kljax.train import grpo, sft

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def countdown_config(data_dir, **changes):
  spec = importlib.util.spec_from_file_location(
      "grpo_countdown", os.path.join(REPO, "configs", "grpo_countdown.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.data.data_dir, c.mesh.devices, c.metrics.tensorboard = data_dir, 1, False
  c.update_from_flattened_dict(changes)  # {"kl.term": …}
  return c


def _no_training(*args, **kwargs):
  raise AssertionError("a model was created: the check did not run before training")


def test_encode_pairs_layout():
  # CharTokenizer ids: <pad> 0, <bos> 1, <eos> 2, then "0123456789+-*/=" from 3: "1" 4, "2" 5,
  # "3" 6, "+" 13, "=" 17.
  tok = text.CharTokenizer()
  ex = {"question": "1+2=", "answer": "3"}
  tokens, attn, target = sft.encode_pairs(tok, [ex], prompt_len=5, completion_len=2)
  np.testing.assert_array_equal(tokens, [[1, 4, 13, 5, 17, 6, 2]])
  np.testing.assert_array_equal(attn, [[1, 1, 1, 1, 1, 1, 1]])
  np.testing.assert_array_equal(target, [[0, 0, 0, 0, 0, 1, 1]])
  tokens, attn, target = sft.encode_pairs(tok, [ex], prompt_len=6, completion_len=1,
                                          prompt_template="Q{question}", add_bos=False)
  np.testing.assert_array_equal(tokens[0, :6], [tok.encode("Q")[0], 4, 13, 5, 17, 6])  # EOS cut
  np.testing.assert_array_equal(target, [[0, 0, 0, 0, 0, 1, 0]])
  with pytest.raises(ValueError, match=r"prompt_len=4: the prompt '1\+2=' encodes to 5 tokens"):
    sft.encode_pairs(tok, [ex], prompt_len=4, completion_len=2)


def test_the_issue_lengths_supervise_every_example(data_dir):
  """max_prompt_len=32, max_new_tokens=12 on countdown/n3: the old fixed 16 tokens kept no answer
  token; now every example keeps min(len(answer) + 1, 12) supervised tokens."""
  examples = data.load("countdown/n3", "train", data_dir=data_dir).take(range(2000))
  _, _, target = sft.encode_pairs(text.CharTokenizer(), examples, prompt_len=32, completion_len=12)
  np.testing.assert_array_equal(target.sum(1), [min(len(e["answer"]) + 1, 12) for e in examples])


def test_train_sft_refuses_prompts_longer_than_prompt_len_before_training(data_dir, monkeypatch):
  monkeypatch.setattr(sft.models, "create", _no_training)
  with pytest.raises(ValueError, match=r"prompt_len=24: the longest prompt of countdown/n3 \(train "
                                       r"example \d+, 'use .* to make \d+:'\) encodes to 27 tokens.*"
                                       r"raise prompt_len to at least 27"):
    sft.train_sft(preset="tiny", dataset="countdown/n3", data_dir=data_dir, steps=10,
                  prompt_len=24, completion_len=14)
  with pytest.raises(ValueError, match="completion_len must be >= 1, got 0"):
    sft.train_sft(preset="tiny", dataset="countdown/n3", data_dir=data_dir, steps=10,
                  prompt_len=27, completion_len=0)
  with pytest.warns(UserWarning, match=r"\d+ of 20000 answers of countdown/n3 \(with EOS\) take "
                                       r"more than completion_len=8 tokens \(the longest 13\)"):
    with pytest.raises(AssertionError, match="a model was created"):  # warned, then trains
      sft.train_sft(preset="tiny", dataset="countdown/n3", data_dir=data_dir, steps=10,
                    prompt_len=27, completion_len=8)


def test_initial_model_names_the_flag_before_training(data_dir, tmp_path, monkeypatch):
  monkeypatch.setattr(sft.models, "create", _no_training)
  config = countdown_config(data_dir, **{"data.max_prompt_len": 24})
  with pytest.raises(grpo.ConfigError,
                     match=r"--config.data.max_prompt_len: the longest prompt of countdown/n3 "
                           r"\(train example \d+, '.*'\) takes 27 tokens with <bos>, more than "
                           r"max_prompt_len=24; raise --config.data.max_prompt_len to at least 27"):
    sft.initial_model(config, str(tmp_path / "sft"))
  assert not os.path.exists(tmp_path / "sft")
  with pytest.raises(grpo.ConfigError, match="--config.data.max_prompt_len"):
    grpo.build(config)  # a run from a given checkpoint is checked too


def test_countdown_config_validates_and_fits(data_dir):
  config = countdown_config(data_dir)
  grpo.validate(config)
  grpo.check_prompt_lengths(config)  # 27 is exactly the longest prompt
  with pytest.raises(grpo.ConfigError, match="at least 27"):
    grpo.check_prompt_lengths(countdown_config(data_dir, **{"data.max_prompt_len": 26}))


@pytest.mark.slow
def test_a_short_countdown_run_scores_with_the_countdown_reward(data_dir, tmp_path):
  config = countdown_config(data_dir, num_steps=2, checkpoint_every=1, batch_size=16,
                            **{"rollout.group_size": 4, "sft.steps": 20})
  model = sft.initial_model(config, str(tmp_path / "sft"))
  history = grpo.train(config, str(tmp_path / "run"), init_model=model, progress=False)
  assert [h["step"] for h in history] == [0, 1]
  assert all(0.0 <= h["reward_mean"] <= 1.0 and h["reward_failures"] == 0 for h in history)
