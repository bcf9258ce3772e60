"""The sequence-variance study runs end to end on a small setting: rows for every term and length,
an unbiased sampled gradient, a figure and a markdown section."""

import os

from experiments.studies import sequence_variance


def test_study_small_run(tmp_path, monkeypatch):
  monkeypatch.setattr(sequence_variance, "_settings", lambda quick: dict(
      vocab=3, lengths=(1, 3), seeds=1, num_samples=8, num_trials=128, distance=0.7))
  monkeypatch.setattr(sequence_variance, "_model_settings", lambda quick: dict(
      preset="tiny", prompts=4, group=2, prompt_len=3, new_tokens=4, batches=4, noise=0.05))
  results = sequence_variance.run(quick=True, workdir=str(tmp_path))
  model = results["model"]
  assert model["k1_in_reward_rtg"] > 0 and model["exact_rkl_rb"] > 0 and model["ratio"] > 0
  assert len(results["rows"]) == 2 * 4  # lengths × the four terms
  for row in results["rows"]:
    # unbiased: the mean of 128 batches sits within Monte-Carlo noise of the exact gradient
    assert row["bias_over_norm"] < 4 * row["std_over_norm"] / 128 ** 0.5 + 1e-5
  rb = {r["length"]: r["std_over_norm"] for r in results["rows"] if r["term"] == "exact_rkl_rb"}
  k1 = {r["length"]: r["std_over_norm"] for r in results["rows"]
        if r["term"] == "k1_in_reward_rtg"}
  assert rb[1] < 1e-5 < k1[1] and rb[3] < k1[3]
  path = os.path.join(tmp_path, "sequence_variance.png")
  sequence_variance.figure(results, path)
  assert os.path.getsize(path) > 10_000
  text = sequence_variance.markdown(results)
  assert "| sequence ∇RKL | 3 | `k1_in_reward_rtg` |" in text and "∞ (no noise)" in text
  assert "On a decoder" in text
