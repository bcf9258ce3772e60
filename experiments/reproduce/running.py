"""Running the reproduction: the oracle table, the bandit and its regime map, GRPO on- and
off-policy, exact sequences and the stressing GRPO runs; then results.json, figures and report.

Every piece of work that takes long is kept in WORKDIR and read back by a later invocation (GRPO
runs, warm starts, the sequence study), together with its wall time, so that the report's total
time is what its results cost, however many invocations produced them.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

import numpy as np

from experiments import figures
from experiments.reproduce import report, settings as settings_lib, verdicts as verdicts_lib
from experiments.reproduce.settings import (BANDIT_TERMS, BEFORE_NORM, OFF_POLICY,
                                            OFF_POLICY_REWARD_AT, ON_POLICY, REGIME_BETAS,
                                            REGIME_PAIRS, REGIME_PI_REF, REWARD_AT_CURRENT,
                                            REWARD_AT_ROLLOUT,
                                            REGIME_TERMS, SEQUENCE, SEQUENCE_TERMS, VERL_K3)
from kljax import paths, study
from kljax.train.options import as_names

def regime_term(name: str):
  """A KLTerm by name, including the verl-style value-clamped k3 (`VERL_K3`)."""
  from kljax.kl import kl_term

  if name == VERL_K3:
    import jax.numpy as jnp

    import kljax

    return kljax.as_loss(lambda lp, lq: jnp.clip(kljax.k3(lp, lq), -10.0, 10.0), name=VERL_K3)
  return kl_term(name)


def run_regimes(terms=REGIME_TERMS, *, modes=("exact", "sampled"), pi_ref_best=REGIME_PI_REF,
                betas=REGIME_BETAS, num_steps: int = 3000, progress: bool = True) -> list[dict]:
  """The bandit regime map (`kljax.bandit.regime_map`) as records {"term", "pi_ref_best", "beta",
  "gradients", "final_rkl", "final_fkl", "reward", "tv_star", "tv_fkl", "log_ratio_best"}."""
  from kljax.progress import bar as tqdm  # log lines when not on a terminal

  from kljax import bandit

  out = []
  jobs = [(m, t) for m in modes for t in terms]
  for mode, name in tqdm(jobs, desc="bandit regime map", unit="term", disable=not progress):
    grid = bandit.regime_map(regime_term(name), mode=mode, pi_ref_best=pi_ref_best, betas=betas,
                             num_steps=num_steps)
    for i, p in enumerate(pi_ref_best):
      for j, b in enumerate(betas):
        out.append({"term": name, "pi_ref_best": float(p), "beta": float(b), "gradients": mode,
                    **{k: float(v[i, j]) for k, v in grid.items()}})
  return out


def spikes(grad_norms, factor: float = 5.0) -> int:
  """Steps whose gradient norm exceeds `factor` × the run's median gradient norm."""
  g = np.asarray(grad_norms, np.float64)
  return int(np.sum(g > factor * np.median(g))) if g.size else 0


def run_sequence_study(settings, workdir, *, progress: bool = True) -> dict:
  """The exact sequence study (`kljax.tabular_rl`) and the gradient noise of k2 vs k3 along its
  trajectories; cached in WORKDIR/sequence.json with its wall time ("seconds"), and read back by a
  later invocation with the same settings."""
  import jax

  from kljax import exact, tabular_rl

  path = paths.resolve(workdir) / "sequence.json"
  key = {"seeds": settings.sequence_seeds, "steps": settings.sequence_steps, **SEQUENCE}
  if path.exists():
    cached = json.loads(path.read_text())
    if cached.get("key") == key:
      return cached
  start = time.time()
  ref = exact.random_tabular(jax.random.PRNGKey(1), vocab=SEQUENCE["vocab"],
                             length=SEQUENCE["length"])
  target = tabular_rl.rare_target(ref, SEQUENCE["ref_prob_target"])
  ref_prob = float(np.exp(np.sum(np.asarray(exact.token_logprobs(ref))[target])))
  out = {"key": key, "vocab": SEQUENCE["vocab"], "length": SEQUENCE["length"],
         "beta": SEQUENCE["beta"], "ref_prob_target": ref_prob, "terms": {}, "curves": {},
         "noise": {}, "noise_samples": SEQUENCE["num_samples"]}
  snaps = {}
  from kljax.progress import bar as tqdm  # log lines when not on a terminal

  for name in tqdm(SEQUENCE_TERMS, desc="sequence study", unit="term", disable=not progress):
    tr = tabular_rl.train(regime_term(name), ref, target, beta=SEQUENCE["beta"],
                          num_steps=settings.sequence_steps, seeds=settings.sequence_seeds,
                          num_samples=SEQUENCE["num_samples"],
                          learning_rate=SEQUENCE["learning_rate"],
                          grad_clip=SEQUENCE["grad_clip"], snapshot_every=25)
    c = tr.curves
    snaps[name] = tr.snapshots
    out["curves"][name] = {k: v.tolist() for k, v in c.items()}
    out["terms"][name] = {
        "final_rkl_seeds": c["rkl"][:, -1].tolist(), "final_fkl_seeds": c["fkl"][:, -1].tolist(),
        "final_target_prob_seeds": c["target_prob"][:, -1].tolist(),
        "max_rkl": float(c["rkl"].max()), "spikes": sum(spikes(g) for g in c["grad_norm"]),
        "max_grad_norm": float(c["grad_norm"].max()),
        "max_abs_log_delta": float(c["max_abs_log_delta"].max())}
  out["optimum_target_prob"] = float(exact.optimum_reverse(
      [ref_prob, 1 - ref_prob], [1.0, 0.0], SEQUENCE["beta"])[0])  # y* vs the rest: π* ∝ π_ref e^{r/β}
  # Noise of both estimators at the same policies: the snapshots of both trajectories (from step
  # 25 on; at θ = π_ref the exact KL gradient is 0).
  states = [tuple(t[1:] for t in snaps[n]) for n in ("k2_as_loss", "k3_as_loss")]
  pooled = tuple(np.concatenate([a, b]) for a, b in zip(*states))
  out["noise_steps"] = [25 * i for i in range(1, len(states[0][0]) + 1)] * 2
  for name in ("k2_as_loss", "k3_as_loss"):
    out["noise"][name] = tabular_rl.kl_gradient_noise(
        regime_term(name), pooled, ref, jax.random.PRNGKey(7),
        num_samples=SEQUENCE["num_samples"]).tolist()
  out["seconds"] = time.time() - start
  paths.write_atomic(path, json.dumps(out))
  return out


def run_studies(settings, workdir) -> dict:
  """Beyond the paper (`experiments/studies`): the variance of the sequence ∇RKL estimators and
  GRPO under stale rollouts, at size `settings.studies` ("none": skipped, {}); cached in
  WORKDIR/studies.json with their wall time ("seconds"), read back when the size matches."""
  from experiments.studies import sequence_variance, staleness

  size = settings.get("studies", "quick")
  if size == "none":
    return {}
  path = workdir / "studies.json"
  if path.exists():
    cached = json.loads(path.read_text())
    if cached.get("size") == size:
      return cached
  quick = size == "quick"
  start = time.time()
  out = {"size": size,
         "sequence_variance": sequence_variance.run(quick=quick),
         "staleness": staleness.run(quick, workdir / "studies")}
  out["seconds"] = time.time() - start
  paths.write_atomic(path, json.dumps(out, default=float))
  return out


def stability(runs: dict[str, list[list[dict]]], window: int) -> dict[str, dict[str, float]]:
  """Per variant: max per-step exact KL (over seeds), gradient-norm spikes (all seeds), seeds whose
  final entropy fell below 10% of their step-0 entropy (collapse), and the largest log π/π_ref of a
  sampled completion."""
  out = {}
  for v, hs in runs.items():
    out[v] = {"max_step_rkl": max(r["exact_rkl"] for h in hs for r in h),
              "spikes": sum(spikes([r["grad_norm"] for r in h]) for h in hs),
              "collapsed": sum(study.final(h, "entropy", window) < 0.1 * h[0]["entropy"] for h in hs),
              "max_seq_log_ratio": max(r.get("max_seq_log_ratio", float("nan"))
                                       for h in hs for r in h)}
  return out


def stress_target(config, warm_start) -> dict[str, Any] | None:
  """How rare the stress reward's best completion is under the stress runs' reference (their warm
  start): log π_ref(TARGET | prompt) over 200 test prompts, teacher-forced; None when the config's
  reward is not `experiments.rare_target:target_match`."""
  from experiments import rare_target, stress_refprob

  if as_names(config.reward.fns) != ("experiments.rare_target:target_match",):
    return None
  logp = stress_refprob.correct_logprobs(
      str(warm_start), config.data.name, config.data.max_prompt_len, config.rollout.max_new_tokens,
      count=200, answer=rare_target.TARGET, data_dir=config.data.data_dir)
  return {"text": rare_target.TARGET, "prompts": int(logp.size),
          "mean_log_ref": float(np.mean(logp)), "max_log_ref": float(np.max(logp))}


def reward_stage_audit() -> dict[str, str]:
  """What each reward stage's KL gradient follows for sequences on-policy (`kljax.audit`, exact
  enumeration). before_norm is audited with σ_g held fixed: its surrogate sg(Σ_t k1_t)·log π_t."""
  import jax
  import jax.numpy as jnp

  from kljax import audit

  def before_norm(logp, ref_logp, old_logp, mask):
    return jax.lax.stop_gradient(jnp.sum((old_logp - ref_logp) * mask, -1, keepdims=True)) * logp

  seq = "sequences, on-policy"
  return {
      "k1_in_reward (after_norm, token credit)":
          audit.audit("k1_in_reward", seeds=1).result(seq).follows,
      "k1_in_reward_rtg (after_norm, reward-to-go credit)":
          audit.audit("k1_in_reward_rtg", seeds=1).result(seq).follows,
      "k1_in_reward@before_norm (whole-sequence credit, σ_g fixed)":
          audit.audit(before_norm, signature="sequence", seeds=1,
                      name="before_norm").result(seq).follows}


def reward_stage_effect(grpo_summary: dict) -> dict[str, Any]:
  """k1_in_reward with the KL subtracted after vs before the group normalization: final values of
  each and the Welch p of their difference, per metric."""
  a, b = grpo_summary.get("k1_in_reward"), grpo_summary.get(BEFORE_NORM)
  if a is None or b is None:
    return {}
  return {m: {"after_norm": a[m], "before_norm": b[m], "after_norm_seed_std": a[f"{m}_seed_std"],
              "before_norm_seed_std": b[f"{m}_seed_std"], "p": verdicts_lib._test(b, a, m)["p"]}
          for m in ("exact_rkl", "reward", "entropy")}


def reward_at_effect(off_summary: dict) -> dict[str, Any]:
  """k1_in_reward off-policy with the penalty held from rollout vs recomputed at the current
  parameters: final values of each, their difference and the Welch and exact permutation p."""
  a, b = off_summary.get(REWARD_AT_ROLLOUT), off_summary.get(REWARD_AT_CURRENT)
  if a is None or b is None:
    return {}
  out = {}
  for m in ("exact_rkl", "reward", "entropy"):
    perm = study.permutation_test(b[f"{m}_seeds"], a[f"{m}_seeds"])
    out[m] = {"rollout": a[m], "current": b[m], "rollout_seed_std": a[f"{m}_seed_std"],
              "current_seed_std": b[f"{m}_seed_std"], "difference": b[m] - a[m],
              "p": verdicts_lib._test(b, a, m)["p"], "permutation_p": perm["p"],
              "permutation_min_p": perm["min_p"]}
  return out


def reward_at_audit() -> dict[str, str]:
  """What k1_in_reward's KL gradient follows off-policy under each reward_at (`kljax.audit`)."""
  from kljax import audit

  out = {}
  for at in ("rollout", "current"):
    r = audit.audit("k1_in_reward", penalty_at=at, seeds=1)
    out[at] = "; ".join(f"{s}: {r.result(s).verdict}"
                        for s in ("one token, off-policy", "sequences, off-policy"))
  return out


# ---------------------------------------------------------------- the whole job




# ---------------------------------------------------------------- the whole job


def _grpo_block(settings, workdir, variants, *, block: str, progress: bool, trained: list,
                costs: dict, off_policy: bool = False, stress: bool = False):
  return study.run_variants(
      lambda v, s: settings_lib.grpo_config(settings, v, s, off_policy=off_policy, stress=stress),
      workdir, variants, seeds=settings.stress_seeds if stress else settings.seeds, block=block,
      warm_start="sft_stress" if stress else "sft", progress=progress, trained=trained,
      costs=costs)


def run(settings, workdir, *, progress: bool = True) -> dict:
  """Runs everything (reading finished parts back) and writes report.md, results.json and the
  figures into `workdir` (local or a URL); returns results.json's content."""
  import platform

  from kljax import bandit, gradient_table
  from kljax.train import grpo

  settings_lib.validate(settings)
  # bad settings fail first
  for variants, off in ((ON_POLICY, False), (OFF_POLICY + OFF_POLICY_REWARD_AT, True)):
    for v in variants:
      grpo.validate(settings_lib.grpo_config(settings, v, 0, off_policy=off))
  for v in settings_lib.split(settings.stress_variants):
    grpo.validate(settings_lib.grpo_config(settings, v, 0, stress=True))
  paths.check_reachable(workdir, flag="--workdir")
  workdir = paths.resolve(workdir)
  if paths.is_local(workdir):
    workdir.mkdir(parents=True, exist_ok=True)
  start = time.time()
  rows = gradient_table.table(settings_lib.oracle_terms(settings))
  problem = bandit.make_problem(**settings_lib.BANDIT_PROBLEM)
  bandit_runs = bandit.run_all(problem, BANDIT_TERMS, modes=settings_lib.split(settings.bandit_modes),
                               num_steps=settings.bandit_steps,
                               learning_rate=settings_lib.BANDIT_LEARNING_RATE, progress=progress)
  bandit_summary = {}
  for r in bandit_runs:
    d = bandit.final_distances(r, problem)
    bandit_summary[f"{r.term} @ {r.mode}"] = {**d, "nearest": verdicts_lib.nearest_optimum(d)}
  figures.bandit_final(bandit_runs, lambda r: bandit.final_distances(r, problem),
                       workdir / "bandit_final_distances.png")
  exact_bandit = {k.split(" @ ")[0]: d for k, d in bandit_summary.items() if k.endswith("exact")}
  regimes = run_regimes(modes=settings_lib.split(settings.bandit_modes),
                        num_steps=settings.regime_steps, progress=progress)
  for term in REGIME_PAIRS:
    figures.regime_map(regimes, term, workdir / report.regime_file(term))
  uncached_seconds = time.time() - start  # the parts every invocation recomputes

  fresh: list = []  # GRPO runs trained (not read back) by this invocation
  costs: dict[str, float] = {}  # wall time of every cached piece of work the report uses
  block = lambda *a, **k: _grpo_block(settings, workdir, *a, progress=progress, trained=fresh,
                                      costs=costs, **k)
  runs = {"on_policy": block(ON_POLICY, block="on_policy"),
          "off_policy": block(OFF_POLICY + OFF_POLICY_REWARD_AT, block="off_policy",
                              off_policy=True)}
  grpo_summary = study.summarize(runs["on_policy"], settings.final_window)
  off_summary = study.summarize(runs["off_policy"], settings.final_window)
  gaps = study.trajectory_gap(runs["on_policy"]["k2_as_loss"], runs["on_policy"]["k1_in_reward"])
  param_gaps = [study.final_param_distance(*(workdir / "grpo" / "on_policy" / v / f"seed{s}"
                                             for v in ("k2_as_loss", "k1_in_reward")))
                for s in range(settings.seeds)]
  for g, d in zip(gaps, param_gaps):
    g["final_rel_param_distance"] = d
  seq = run_sequence_study(settings, workdir, progress=progress)
  costs[str(workdir / "sequence.json")] = seq.get("seconds", math.nan)
  runs["stress"] = block(settings_lib.split(settings.stress_variants), block="stress", stress=True)
  studies = run_studies(settings, workdir)
  if studies:
    costs[str(workdir / "studies.json")] = studies["seconds"]
  start = time.time()
  figures.sequence_study(seq, workdir / "sequence_study.png")
  figures.gradient_noise(seq, workdir / "gradient_noise.png")
  stress_config = settings_lib.grpo_config(settings, "none", 0, stress=True)
  window = min(settings.final_window, stress_config.num_steps)
  stress = {"summary": study.summarize(runs["stress"], window),
            "stability": stability(runs["stress"], window),
            "target": stress_target(stress_config, workdir / "sft_stress"),
            "description": f"`configs/{settings.stress_config}.py`: {stress_config.data.name} "
                           f"prompts, reward `{','.join(as_names(stress_config.reward.fns))}`, a "
                           f"{stress_config.sft.steps}-step warm start, learning rate "
                           f"{stress_config.optim.learning_rate:g}, β = {stress_config.kl.beta:g}, "
                           f"{stress_config.num_steps} steps, {settings.stress_seeds} seeds"}
  figures.grpo_curves(runs["stress"], workdir / "grpo_stress.png",
                      f"GRPO stress ({stress['description'].split(': ', 1)[1]}), mean over seeds")
  extra = {"regimes": regimes, "sequence": seq, "stress": stress,
           "off_policy_means": study.run_means(runs["off_policy"],
                                               ("ppo_kl", "kl_grad_zeroed_fraction")),
           "warm_max_seq_log_ratio": max((row.get("max_seq_log_ratio", float("nan"))
                                          for h in runs["on_policy"]["k2_as_loss"] for row in h),
                                         default=float("nan"))}
  figures.grpo_curves(runs["on_policy"], workdir / "grpo_on_policy.png",
                      f"GRPO on-policy, β = {settings.beta} for every KL term, mean over "
                      f"{settings.seeds} seed(s)")
  figures.grpo_curves(runs["off_policy"], workdir / "grpo_off_policy.png",
                      f"GRPO off-policy ({settings.off_policy_epochs} epochs × "
                      f"{settings.off_policy_minibatches} minibatches a rollout), β = "
                      f"{settings.beta} for every KL term, mean over {settings.seeds} seed(s)")
  figures.trajectory_gaps(gaps, workdir / "trajectory_k2_vs_k1_in_reward.png")
  if studies:
    from experiments.studies import sequence_variance, staleness

    sequence_variance.figure(studies["sequence_variance"], workdir / "sequence_variance.png")
    staleness.figure(studies["staleness"], workdir / "staleness.png")

  results = {
      "grpo": grpo_summary,
      "grpo_off_policy": off_summary,
      "bandit": bandit_summary,
      "oracle": {s: {r.term: {"coefficient": r.coefficient, "grad_norm": r.grad_norm,
                              "to_rkl": r.to_rkl, "to_fkl": r.to_fkl,
                              "to_frozen": None if math.isnan(r.to_frozen) else r.to_frozen,
                              "to_frozen_fkl": (None if math.isnan(r.to_frozen_fkl)
                                                else r.to_frozen_fkl),
                              "follows": r.follows} for r in rows if r.setting == s}
                 for s in dict.fromkeys(r.setting for r in rows)},
      "trajectory": [{k: v for k, v in g.items() if not isinstance(v, list)} for g in gaps],
      "off_policy_means": extra["off_policy_means"],
      "regimes": [{k: r[k] for k in ("term", "pi_ref_best", "beta", "gradients", "final_rkl",
                                     "final_fkl", "reward", "tv_star", "tv_fkl")} for r in regimes],
      "sequence": {k: v for k, v in seq.items() if k not in ("curves", "key", "seconds")},
      "grpo_stress": {"summary": stress["summary"], "stability": stress["stability"],
                      "target": stress["target"], "description": stress["description"]},
      "studies": {k: v for k, v in studies.items() if k != "seconds"},
      "reward_stage": reward_stage_effect(grpo_summary),
      "reward_stage_audit": reward_stage_audit(),
      "reward_at": reward_at_effect(off_summary),
      "reward_at_audit": reward_at_audit(),
      "warm_max_seq_log_ratio": extra["warm_max_seq_log_ratio"],
      "verdicts": verdicts_lib.verdicts(rows, exact_bandit, grpo_summary, off_summary, gaps,
                                        param_gaps, extra),
      "meta": {"settings": settings.to_dict(),
               "modified": settings_lib.modifications(settings),
               "machine": f"{os.cpu_count()} CPU cores ({platform.machine()})"},
  }
  uncached_seconds += time.time() - start
  unknown = [k for k, v in costs.items() if math.isnan(v)]
  results["meta"]["seconds"] = uncached_seconds + sum(v for v in costs.values()
                                                      if not math.isnan(v))
  results["meta"]["seconds_recomputed"] = uncached_seconds
  results["meta"]["seconds_cached"] = {k[len(str(workdir)) + 1:]: v for k, v in costs.items()}
  results["meta"]["costs_unknown"] = len(unknown)
  results["meta"]["grpo_runs_trained"] = len(fresh)
  results["meta"]["grpo_runs_read_back"] = sum(len(h) for r in runs.values()
                                               for h in r.values()) - len(fresh)
  paths.write_atomic(workdir / "results.json", json.dumps(results, indent=1, ensure_ascii=False))
  report.write_report(workdir / "report.md", settings, results, gradient_table.markdown(rows))
  return results
