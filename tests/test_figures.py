"""The experiments' figures: what they leave out, what they state, and no matplotlib warnings."""

import warnings

import numpy as np
import pytest

from experiments import figures


def _rows(seed, *, steps=40, shift=0.0):
  r = np.random.default_rng(seed)
  return [{"step": i, "reward_mean": 0.4 + shift + 0.05 * r.standard_normal(),
           "accuracy": None, "exact_rkl": 0.01 * i + shift, "entropy": 0.7 - 0.001 * i,
           "length_mean": 4.0, "clip_fraction": 0.0} for i in range(steps)]


def test_moving_average_matches_a_hand_computed_mean():
  x = np.array([1.0, 2.0, 4.0, 8.0])
  np.testing.assert_allclose(figures.moving_average(x, 2), [1.5, 3.0, 6.0])
  np.testing.assert_allclose(figures.moving_average(x, 1), x)
  np.testing.assert_allclose(figures.moving_average(x, 9), x)  # shorter than the window: as is
  np.testing.assert_allclose(figures.moving_average(np.stack([x, 2 * x]), 3),
                             [[7 / 3, 14 / 3], [14 / 3, 28 / 3]])


def test_grpo_curves_leave_out_panels_without_information(tmp_path):
  runs = {"k2_as_loss": [_rows(0), _rows(1)], "k1_in_reward": [_rows(0), _rows(1)],
          "none": [_rows(2, shift=0.1), _rows(3, shift=0.1)]}
  for hs in runs.values():
    for h in hs:
      for row in h:
        row["accuracy"] = row["reward_mean"]  # a 0/1 reward: accuracy repeats it
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # e.g. "No artists with labels found to put in legend"
    drawn = figures.grpo_curves(
        runs, tmp_path / "c.png", "t", smooth=5,
        metrics=("reward_mean", "accuracy", "exact_rkl", "length_mean", "clip_fraction"))
  assert drawn == ["reward_mean", "exact_rkl"]  # constant length and clip fraction, accuracy = reward
  assert (tmp_path / "c.png").stat().st_size > 5000
  with pytest.raises(ValueError, match="no metric of"):
    figures.grpo_curves(runs, tmp_path / "d.png", "t", metrics=("length_mean",))


def test_identical_runs_are_named_and_colours_are_distinct():
  a = np.arange(5.0)
  assert figures.identical_series({"k2_as_loss": a, "k1_in_reward": a.copy(), "none": a + 1}) == [
      ("k2_as_loss", "k1_in_reward")]
  colours = [figures.colour(i) for i in range(60)]
  assert len(set(colours)) == 60
  with pytest.raises(ValueError, match="at most 60 series"):
    figures.colour(60)


def test_plot_labels_runs_by_kl_term_and_beta(tmp_path):
  import json

  from experiments.plot import run_label

  rows = [{"step": 0, "beta": 0.05}]
  (tmp_path / "a").mkdir()
  (tmp_path / "a" / "config.json").write_text(json.dumps({"kl": {"term": "k3_as_loss",
                                                                 "beta": 0.05}}))
  assert run_label(str(tmp_path / "a"), rows) == "k3_as_loss, β = 0.05"
  (tmp_path / "b").mkdir()  # no config written: the directory and the β its metrics logged
  assert run_label(str(tmp_path / "b"), rows) == "b, β = 0.05"
