"""The bandit experiment converges where the theory says, and its CLI writes what it promises."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from kljax import bandit, exact
from kljax.kl import kl_term

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def problem():
  return bandit.make_problem(num_arms=10, beta=0.3, seed=0)


@pytest.fixture(scope="module")
def exact_runs(problem):
  names = ["k1_in_reward", "k2_as_loss", "k3_as_loss", "k1_as_loss"]
  return {
      n: bandit.run(problem, kl_term(n), mode="exact", num_steps=3000, learning_rate=0.1)
      for n in names
  }


def test_optima_are_distinct(problem):
  assert exact.tv_distance(problem.pi_star, problem.pi_fkl) > 0.1
  assert exact.tv_distance(problem.pi_star, problem.pi_zero) > 0.1


@pytest.mark.parametrize("name", ["k1_in_reward", "k2_as_loss"])
def test_reverse_kl_terms_reach_pi_star(exact_runs, problem, name):
  assert exact.tv_distance(exact_runs[name].final_probs, problem.pi_star) < 1e-3


def test_k3_as_loss_reaches_the_forward_kl_optimum(exact_runs, problem):
  assert exact.tv_distance(exact_runs["k3_as_loss"].final_probs, problem.pi_fkl) < 1e-3


def test_k1_as_loss_does_not_regularize(exact_runs, problem):
  d = bandit.final_distances(exact_runs["k1_as_loss"], problem)
  assert d["tv_zero"] < 1e-2 and d["tv_star"] > 0.1


def test_sampled_off_policy_run_is_finite_and_near_pi_star(problem):
  run = bandit.run(problem, kl_term("k2_as_loss+detached_ratio"), mode="sampled",
                   num_steps=600, learning_rate=0.1, num_samples=64, inner_steps=4)
  assert run.curves["tv_star"].shape == (600,)
  assert bandit.final_distances(run, problem)["tv_star"] < 0.1


def test_bad_run_arguments(problem):
  with pytest.raises(ValueError, match=r"num_steps \(10\) must be a positive multiple of inner_steps \(3\)"):
    bandit.run(problem, kl_term("k2_as_loss"), mode="exact", num_steps=10, learning_rate=0.1,
               inner_steps=3)
  with pytest.raises(ValueError, match="mode must be one of exact, sampled, got 'mc'"):
    bandit.run(problem, kl_term("k2_as_loss"), mode="mc", num_steps=10, learning_rate=0.1)
  with pytest.raises(ValueError, match="beta must be a finite number > 0, got -1"):
    bandit.make_problem(num_arms=4, beta=-1, seed=0)


def _cli(*args):
  return subprocess.run(
      [sys.executable, "-m", "experiments.bandit", "--config", "configs/bandit.py", *args],
      cwd=REPO, capture_output=True, text=True, timeout=300,
  )


def test_cli_writes_table_json_and_plots(tmp_path):
  out = _cli(f"--workdir={tmp_path}", "--config.num_steps=60", "--config.terms=k2_as_loss,k3_as_loss")
  assert out.returncode == 0, out.stderr
  for name in ["results.md", "results.json", "final_distances.png", "curves.png"]:
    assert (tmp_path / name).stat().st_size > 0
  table = (tmp_path / "results.md").read_text()
  assert table.count("| `k2_as_loss` |") == 2 and "| `k3_as_loss` | sampled |" in table
  runs = json.loads((tmp_path / "results.json").read_text())["runs"]
  assert {(r["term"], r["mode"]) for r in runs} == {
      (t, m) for t in ["k2_as_loss", "k3_as_loss"] for m in ["exact", "sampled"]}
  assert all(np.isclose(sum(r["final_probs"]), 1.0) for r in runs)


def test_cli_rejects_bad_config_before_running(tmp_path):
  out = _cli(f"--workdir={tmp_path}", "--config.terms=k2_as_loss,k9_as_loss")
  assert out.returncode != 0
  assert "--config.terms: unknown KL term 'k9_as_loss'" in out.stderr
  out = _cli(f"--workdir={tmp_path}", "--config.inner_steps=7")
  assert out.returncode != 0 and "must be a positive multiple of inner_steps (7)" in out.stderr


def test_regime_map_reaches_the_closed_forms_of_the_hard_regime():
  """Reward 1 on an arm with π_ref = 1e-4, β = 0.5 (hand derivation, float64 NumPy):
  k2 as loss → π*(best) = 1e-4·e² / (1 − 1e-4 + 1e-4·e²), reverse KL ≈ 1e-3; k3 as loss → the
  forward-KL optimum π_i = β q_i / (λ − r_i) with λ − 1 ≈ 1e-4, so π(best) ≈ ½ and KL ≈ 3.9."""
  q = np.full(10, (1 - 1e-4) / 9)
  q[0] = 1e-4
  w = q * np.exp(np.eye(10)[0] / 0.5)
  star = w / w.sum()
  rkl_star = np.sum(star * np.log(star / q))
  lam = 1.0 + np.linspace(1e-6, 1e-3, 200001)  # Σ β q_i / (λ − r_i) = 1, solved on a grid
  total = 0.5 * q[0] / (lam - 1) + 0.5 * (1 - q[0]) / lam
  lam = lam[np.argmin(np.abs(total - 1))]
  fkl_opt = np.concatenate([[0.5 * q[0] / (lam - 1)], 0.5 * q[1:] / lam])
  rkl_fkl_opt = np.sum(fkl_opt * np.log(fkl_opt / q))
  assert rkl_star == pytest.approx(1e-3, rel=0.2) and rkl_fkl_opt == pytest.approx(3.9, abs=0.05)

  k2 = bandit.regime_map(kl_term("k2_as_loss"), mode="exact", pi_ref_best=[1e-4], betas=[0.5])
  k3 = bandit.regime_map(kl_term("k3_as_loss"), mode="exact", pi_ref_best=[1e-4], betas=[0.5])
  assert k2["final_rkl"][0, 0] == pytest.approx(rkl_star, rel=1e-2)
  assert k3["final_rkl"][0, 0] == pytest.approx(rkl_fkl_opt, rel=1e-2)
  assert k2["tv_star"][0, 0] < 1e-3 and k3["tv_fkl"][0, 0] < 1e-3
  assert k2["final_rkl"].shape == (1, 1)
  with pytest.raises(ValueError, match=r"pi_ref_best must be in \(0, 1\), got 1.5"):
    bandit.regime_map(kl_term("k2_as_loss"), mode="exact", pi_ref_best=[1.5], betas=[0.5])
