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
  assert out.returncode != 0 and "must be a multiple of --config.inner_steps (7)" in out.stderr
