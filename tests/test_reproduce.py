"""The oracle table and the end-to-end reproduction (small settings)."""

import json
import os

import jax
import numpy as np
import pytest

from experiments.reproduce import report, running, settings as rsettings, verdicts
from kljax import exact, gradient_table, study


@pytest.mark.parametrize("name, label", [
    ("k1_as_loss", "1"),                          # ∂(logp − ref)/∂logp
    ("k2_as_loss", "log π − log π_ref"),          # ∂½(ref − logp)²/∂logp
    ("k3_as_loss", "1 − δ"),                      # ∂(δ − 1 − log δ)/∂logp, δ = e^{ref − logp}
    ("k1_in_reward", "log π − log π_ref"),
    ("k1_in_reward_rtg", "log π − log π_ref"),    # one token: reward-to-go = the token's own
    ("k2_in_reward", "½(log δ)²"),
    ("k3_in_reward", "δ − 1 − log δ"),
    ("k3_value_k2_grad", "log π − log π_ref"),
    ("k1_value_k3_grad", "1 − δ"),
])
def test_coefficient_identification(name, label):
  assert gradient_table.identify_coefficient(name) == label


def test_frozen_prefix_gradient_with_old_prefixes_matches_numpy():
  """∂/∂θ_t[y<t] of Σ_t Σ_{y<t} P_old(y<t)·KL(π_t‖ρ_t) = P_old(y<t)·p(log p − log q − KL),
  enumerated in float64 NumPy."""
  keys = jax.random.split(jax.random.PRNGKey(3), 3)
  policy, ref, old = (exact.random_tabular(k, vocab=3, length=3) for k in keys)
  got = exact.frozen_prefix_rkl_grad(policy, ref, prefixes=old)

  def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)

  prefix = np.ones(())
  for t in range(3):
    p, q = softmax(np.asarray(policy[t], np.float64)), softmax(np.asarray(ref[t], np.float64))
    kl = np.sum(p * (np.log(p) - np.log(q)), -1, keepdims=True)
    want = prefix[..., None] * p * (np.log(p) - np.log(q) - kl)
    np.testing.assert_allclose(got[t], want, atol=1e-6)
    prefix = prefix[..., None] * softmax(np.asarray(old[t], np.float64))


def test_oracle_rows_name_what_each_term_follows():
  rows = {(r.setting, r.term): r for r in gradient_table.table(
      ["k1_as_loss", "k2_as_loss", "k3_as_loss", "k1_in_reward_rtg", "k2_as_loss+detached_ratio"])}
  assert rows[("one token, on-policy", "k1_as_loss")].follows == "0"
  assert rows[("one token, on-policy", "k2_as_loss")].follows == "∇RKL"
  assert rows[("one token, on-policy", "k3_as_loss")].follows == "∇FKL"
  assert rows[("one token, off-policy", "k2_as_loss")].follows == "biased"
  assert rows[("one token, off-policy", "k2_as_loss+detached_ratio")].follows == "∇RKL"
  assert rows[("sequence, per-token terms, on-policy", "k2_as_loss")].follows == \
      "frozen-prefix ∇RKL"
  assert rows[("sequence, per-token terms, on-policy", "k1_in_reward_rtg")].follows == "∇RKL"
  assert rows[("sequence, per-token terms, off-policy", "k2_as_loss+detached_ratio")].follows == \
      "frozen-prefix ∇RKL, prefixes from π_old"
  assert ("sequence, sequence-level terms, on-policy", "k1_in_reward_rtg") not in rows
  with pytest.raises(ValueError, match="unknown KL term"):
    gradient_table.table(["k4_as_loss"])


def test_settings_reject_bad_values():
  for change, message in [({"seeds": 0}, "seeds must be >= 1, got 0"),
                          ({"beta": -1.0}, "beta must be a finite number > 0"),
                          ({"steps": 0}, "steps must be >= 1, got 0"),
                          ({"bandit_modes": "exact,mc"}, "bandit_modes must be"),
                          ({"oracle_terms": "some"}, "oracle_terms must be 'core' or 'all'"),
                          ({"studies": "tiny"}, "studies must be 'quick', 'full' or 'none'"),
                          ({"stress_config": "grpo_nothing"}, "stress_config must name a module")]:
    config = rsettings.load_config("quick")
    config.update(change)
    with pytest.raises(ValueError, match=message):
      rsettings.validate(config)
  rsettings.validate(rsettings.load_config("full"))
  with pytest.raises(ValueError, match="preset must be one of quick, full, got 'fast'"):
    rsettings.load_config("fast")


def _small_settings(tmp_path):
  config = rsettings.load_config("quick")
  config.update(dict(seeds=1, steps=3, sft_steps=5, final_window=2, bandit_steps=2000,
                     bandit_modes="exact", data_dir=str(tmp_path / "tfds"), regime_steps=50,
                     sequence_seeds=2, sequence_steps=50, stress_seeds=1, stress_steps=3,
                     studies="none"))  # the studies have their own tests
  return config


@pytest.mark.slow
def test_reproduce_end_to_end_small(tmp_path):
  settings = _small_settings(tmp_path)
  work = str(tmp_path / "work")
  results = running.run(settings, work, progress=False)

  on_file = json.load(open(os.path.join(work, "results.json")))
  assert set(on_file["grpo"]) == set(rsettings.ON_POLICY)
  off_variants = rsettings.OFF_POLICY + rsettings.OFF_POLICY_REWARD_AT
  assert set(on_file["grpo_off_policy"]) == set(off_variants)
  # k1_in_reward off-policy by penalty mode: both runs summarized, and what each follows (hand:
  # rollout ∇RKL − ∇KL(π‖π_old), biased; current ∇RKL for one token, tests/test_reward_at.py)
  assert set(on_file["reward_at"]) == {"exact_rkl", "reward", "entropy"}
  assert on_file["reward_at"]["exact_rkl"]["permutation_min_p"] == 1.0  # 1 vs 1 seed
  assert on_file["reward_at_audit"]["rollout"].startswith("one token, off-policy: biased")
  assert on_file["reward_at_audit"]["current"].startswith("one token, off-policy: follows ∇RKL")
  for variant in rsettings.ON_POLICY:
    row = on_file["grpo"][variant]
    assert row["seeds"] == 1
    for metric in ("reward", "exact_rkl", "exact_fkl", "entropy", "reward_std", "length_std"):
      assert isinstance(row[metric], float) and np.isfinite(row[metric])
    assert 0 <= row["reward"] <= 1 and row["exact_rkl"] >= 0
  assert on_file["bandit"]["k3_as_loss @ exact"]["nearest"] == "tv_fkl"
  assert on_file["oracle"]["one token, on-policy"]["k2_as_loss"]["follows"] == "∇RKL"
  # Thm 5.1 end to end: the same seeds give the same batches at every step
  assert on_file["trajectory"][0]["identical_batches_until_step"] == 3
  assert on_file["trajectory"][0]["final_rel_param_distance"] < 1e-5
  assert results["verdicts"]["2_k2_as_loss_equals_k1_in_reward"]["verdict"] == "confirmed"
  text = open(os.path.join(work, "report.md")).read()
  for n in "1234":
    assert f"**{n}. " in text
  regimes = on_file["regimes"]
  assert len(regimes) == len(rsettings.REGIME_TERMS) * 6 * 5
  assert set(regimes[0]) >= {"term", "pi_ref_best", "beta", "gradients", "final_rkl", "final_fkl",
                             "reward"}
  assert set(on_file["sequence"]["terms"]) == set(rsettings.SEQUENCE_TERMS)
  assert set(on_file["grpo_stress"]["summary"]) == set(rsettings.split(settings.stress_variants))
  assert set(on_file["reward_stage"]) == {"exact_rkl", "reward", "entropy"}
  assert "Welch" in results["verdicts"]["1_k1_as_loss_no_regularization"]["evidence"] or \
      "untestable" in results["verdicts"]["1_k1_as_loss_no_regularization"]["evidence"]
  for png in ("grpo_on_policy.png", "grpo_off_policy.png", "trajectory_k2_vs_k1_in_reward.png",
              "bandit_final_distances.png", "sequence_study.png", "gradient_noise.png",
              "grpo_stress.png", *map(report.regime_file, rsettings.REGIME_PAIRS)):
    assert os.path.getsize(os.path.join(work, png)) > 1000

  # Every GRPO run and warm start stored its wall time beside it; the report's total is their sum
  # plus what this invocation recomputed.
  stored = {}
  for root, _, files in os.walk(work):
    for f in files:
      if f.endswith(study.WALL_TIME_FILE):
        stored[os.path.join(root, f)] = json.load(open(os.path.join(root, f)))["seconds"]
  runs = len(rsettings.ON_POLICY) + len(off_variants) + len(on_file["grpo_stress"]["summary"])
  assert len(stored) == runs + 2 and all(v > 0 for v in stored.values())  # + 2 warm starts
  sequence_seconds = json.load(open(os.path.join(work, "sequence.json")))["seconds"]
  meta = on_file["meta"]
  assert sum(meta["seconds_cached"].values()) == pytest.approx(sum(stored.values()) +
                                                               sequence_seconds)
  assert meta["seconds"] == pytest.approx(sum(stored.values()) + sequence_seconds +
                                          meta["seconds_recomputed"])
  assert f"Total time {meta['seconds'] / 60:.1f} min" in text

  # A second call finds every run finished and trains nothing: the metrics files are untouched,
  # and the report's total time is still what the runs cost, not the time of the second call.
  metrics = os.path.join(work, "grpo", "on_policy", "none", "seed0", "metrics.jsonl")
  before = os.stat(metrics).st_mtime_ns
  again = running.run(settings, work, progress=False)["meta"]
  assert os.stat(metrics).st_mtime_ns == before
  assert again["grpo_runs_trained"] == 0 and again["seconds_cached"] == meta["seconds_cached"]
  assert again["seconds"] == pytest.approx(sum(stored.values()) + sequence_seconds +
                                           again["seconds_recomputed"])
  assert again["seconds"] > again["seconds_recomputed"] + sum(stored.values())
  assert "read back from an earlier invocation" in open(os.path.join(work, "report.md")).read()


def test_wall_time_of_a_resumed_run_adds_up(tmp_path):
  path = tmp_path / "run" / study.WALL_TIME_FILE
  assert np.isnan(study.wall_seconds(path))
  study.add_wall_seconds(path, 12.5)  # first invocation, killed
  study.add_wall_seconds(path, 7.25)  # the resumed one
  assert study.wall_seconds(path) == 19.75


# ---- the verdict machinery: inputs that must fail as well as pass ----


def _rows(hashes):
  return [{"tokens_hash": float(h), "reward_mean": 0.5, "length_mean": 3.0, "grad_norm": 1.0,
           "exact_rkl": 0.1} for h in hashes]


def test_trajectory_gap_compares_the_sampled_tokens():
  same = study.trajectory_gap([_rows([1, 2, 3])], [_rows([1, 2, 3])])[0]
  assert same["identical_batches_until_step"] == 3
  # equal reward and length means but different tokens from step 1: not identical
  parted = study.trajectory_gap([_rows([1, 2, 3])], [_rows([1, 7, 3])])[0]
  assert parted["identical_batches_until_step"] == 1
  with pytest.raises(ValueError, match="tokens_hash"):
    study.trajectory_gap([[{"reward_mean": 0.5}]], [[{"reward_mean": 0.5}]])


def test_identical_batches_check_fails_runs_that_differ_from_step_0():
  def gap(split, median):
    return {"identical_batches_until_step": split, "steps": 10,
            "median_rel_grad_norm_gap_while_identical": median}

  assert verdicts.identical_batches_check([gap(10, 0.0)], [1e-7]) == [True]
  assert verdicts.identical_batches_check([gap(10, 0.0)], [1e-2]) == [False]
  assert verdicts.identical_batches_check([gap(4, 1e-7)], [0.3]) == [True]
  assert verdicts.identical_batches_check([gap(4, 1e-2)], [0.3]) == [False]
  assert verdicts.identical_batches_check([gap(0, float("nan"))], [0.3]) == [False]


def test_seed_statistics_match_scipy_and_hand_values():
  from scipy import stats

  assert study.seed_std([1.0, 3.0]) == pytest.approx(np.sqrt(2.0))  # ddof = 1, by hand
  assert np.isnan(study.seed_std([1.0]))
  x, y = [0.10, 0.12, 0.11], [0.20, 0.26, 0.23, 0.21]
  w = study.welch(x, y)
  ref = stats.ttest_ind(x, y, equal_var=False)
  assert w["t"] == pytest.approx(ref.statistic) and w["p"] == pytest.approx(ref.pvalue)
  assert w["n_x"] == 3 and w["n_y"] == 4
  assert w["p"] < rsettings.ALPHA  # clearly apart: differs
  assert study.welch([0.1, 0.3], [0.2, 0.25])["p"] > rsettings.ALPHA  # overlapping: not
  assert np.isnan(study.welch([0.1], [0.2, 0.3])["p"])  # one seed: untestable, not "differs"
  assert study.welch([1.0, 1.0], [1.0, 1.0])["p"] == 1.0
  assert study.welch([1.0, 1.0], [2.0, 2.0])["p"] == 0.0
  row = lambda v: {"reward_seeds": v}
  assert not verdicts._differs(row([0.1]), row([0.9]), "reward")  # untestable → no claim


def test_exact_permutation_test_by_hand_and_against_scipy():
  from scipy import stats

  # 2 vs 2, fully separated: 2 of the C(4, 2) = 6 splits (this one and its mirror) are as extreme.
  t = study.permutation_test([0.92, 0.87], [0.31, 0.32])
  assert t["p"] == pytest.approx(1 / 3) and t["min_p"] == pytest.approx(1 / 3)
  # 4 vs 4, fully separated: 2 / C(8, 4) = 2/70, the smallest p 4 vs 4 can give.
  t = study.permutation_test([0.95, 0.91, 0.94, 0.93], [0.31, 0.31, 0.30, 0.29])
  assert t["p"] == pytest.approx(2 / 70) and t["min_p"] == pytest.approx(2 / 70)
  assert study.permutation_test([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])["p"] == 1.0
  # 1 vs 3: one split of four is the extreme one (no mirror with unequal groups).
  assert study.permutation_test([10.0], [0.0, 0.1, 0.2])["p"] == pytest.approx(1 / 4)
  rng = np.random.default_rng(0)
  x, y = rng.normal(0, 1, 5), rng.normal(1, 1, 4)
  # scipy's "two-sided" doubles the smaller one-sided p; ours counts |difference| ≥ observed
  ref = stats.permutation_test((x, y), lambda a, b: abs(np.mean(a) - np.mean(b)),
                               permutation_type="independent", alternative="greater",
                               n_resamples=np.inf)
  assert study.permutation_test(x, y)["p"] == pytest.approx(ref.pvalue)
  assert "cannot reach p < 0.05" in verdicts.permutation_str([0.9, 0.8], [0.3, 0.2])
  assert "cannot reach" not in verdicts.permutation_str([0.9, 0.8, 0.85, 0.95],
                                                        [0.3, 0.2, 0.25, 0.35])


def test_nearest_optimum_has_a_threshold():
  assert verdicts.nearest_optimum({"tv_star": 0.01, "tv_fkl": 0.3, "tv_zero": 0.6}) == "tv_star"
  assert verdicts.nearest_optimum({"tv_star": 0.2, "tv_fkl": 0.3, "tv_zero": 0.6}) == "none"
  assert verdicts.nearest_optimum({"tv_star": 0.2, "tv_fkl": 0.3}, threshold=0.25) == "tv_star"


def test_regime_boundary_reads_the_grid():
  def rec(term, p, b, rkl):
    return {"term": term, "pi_ref_best": p, "beta": b, "gradients": "exact", "final_rkl": rkl}

  k2 = [rec("k2_as_loss", p, 0.5, 0.01) for p in (1e-1, 1e-2, 1e-3)]
  k3 = [rec("k3_as_loss", 1e-1, 0.5, 0.05), rec("k3_as_loss", 1e-2, 0.5, 0.2),
        rec("k3_as_loss", 1e-3, 0.5, 1.0)]
  assert verdicts.regime_boundary(k2 + k3, "k3_as_loss") == {0.5: [1e-2, 1e-3]}
  k3[0]["final_rkl"] = 0.5  # ≥ 10× and ≥ 0.1 nats everywhere
  assert verdicts.regime_boundary(k2 + k3, "k3_as_loss") == {0.5: [1e-1, 1e-2, 1e-3]}
  k3[2]["final_rkl"] = 0.09  # 9× : not ≥ 10×
  assert verdicts.regime_boundary(k2 + k3, "k3_as_loss") == {0.5: [1e-1, 1e-2]}
  tiny = [rec("k2_as_loss", 1e-3, 1.0, 1e-4), rec("k3_as_loss", 1e-3, 1.0, 0.05)]
  assert verdicts.regime_boundary(tiny, "k3_as_loss") == {1.0: []}  # 500× but 0.05 nats


def test_cli_reaches_its_settings_and_reports_bad_ones_plainly(tmp_path):
  # The README's main job: the entry point runs up to the settings (compile cache included) and a
  # bad value is one usage line, not a traceback.
  import subprocess
  import sys

  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run([sys.executable, "-m", "experiments.reproduce", "--quick", "--workdir",
                        str(tmp_path / "w"), "--config.steps=0", "--compile_cache",
                        str(tmp_path / "cache")], cwd=repo, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode != 0
  assert "--config.steps must be >= 1, got 0" in out.stderr and "Traceback" not in out.stderr, \
      out.stderr


def test_quick_selects_the_quick_preset_under_any_override():
  from experiments.reproduce.__main__ import quick_argv

  argv = quick_argv(["prog", "--workdir=w", "--config.seeds=3", "--quick"])
  assert argv[1].endswith("configs/reproduce.py:quick") and argv[2:] == [
      "--workdir=w", "--config.seeds=3", "--quick"]
  assert quick_argv(["prog", "--workdir=w"]) == ["prog", "--workdir=w"]  # the full preset
  explicit = ["prog", "--quick", "--config=configs/reproduce.py:full"]
  assert quick_argv(explicit) == explicit


@pytest.mark.parametrize("which", ["quick", "full"])
def test_committed_reports_are_what_rewrite_makes_of_their_results(tmp_path, which):
  # The committed report.md and verdicts are a function of the committed results.json: rewriting
  # them from it (no run) changes nothing.
  import shutil

  from experiments.reproduce import rewrite

  src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                     "experiments", "results", which)
  for f in ("results.json", "report.md"):
    shutil.copy(os.path.join(src, f), tmp_path / f)
  rewrite.rewrite(str(tmp_path))
  for f in ("results.json", "report.md"):
    assert (tmp_path / f).read_text() == open(os.path.join(src, f)).read(), (
        f"{which}/{f} is stale: run python -m experiments.reproduce.rewrite "
        f"experiments/results/{which}")
