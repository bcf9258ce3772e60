"""The reproduction of Liu et al. (arXiv:2510.01555): oracle table, bandit, GRPO, report.

`run(settings, workdir)` does three things and writes `report.md`, `results.json` and PNG figures:

1. The gradient table (`kljax.gradient_table`): every term's exact expected gradient against ∇RKL / ∇FKL.
2. The bandit (`kljax.bandit`): where each term's optimization ends, against the closed-form optima,
   and the regime map for claim 3 (one rewarded arm whose π_ref is swept with β).
3. GRPO from one supervised warm start on the arithmetic task, one run per (variant, seed), the same
   seeds for every variant. On-policy: no KL, k1/k2/k3 as loss, k1 in reward (token and reward-to-go
   credit, and subtracted before the group normalization). Off-policy (several epochs × minibatches
   per rollout): k2 as loss without and with each correction.
4. Claim 3 where it can fail: exact sequences (`kljax.tabular_rl`) with the gradient noise of k2 vs
   k3 along their trajectories, and GRPO from a weak warm start (the "stress" runs).

The paper's four claims get a verdict each, computed from these measurements (see `verdicts`), so
the report says what was measured, including where it disagrees with the paper.

A GRPO run's "final" value of a metric is its mean over the last `final_window` steps (one step's
batch of 64 completions is noisy); tables show the mean ± sample std (ddof = 1) of that over seeds,
and "differs" means a two-sided Welch t-test over the seeds gives p < ALPHA (untestable with one
seed).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any

import numpy as np

from kljax import paths

ON_POLICY = ("none", "k1_as_loss", "k2_as_loss", "k3_as_loss", "k1_in_reward", "k1_in_reward_rtg",
             "k1_in_reward@before_norm")
OFF_POLICY = ("k2_as_loss", "k2_as_loss+detached_ratio", "k2_as_loss+ratio", "k2_as_loss+clipped")
METRICS = ("reward", "exact_rkl", "exact_fkl", "entropy", "reward_std", "length_std")
_COLUMN = {"reward": "reward_mean"}  # results.json name -> metrics.jsonl name
CURVES = (("reward_mean", "reward"), ("exact_rkl", "exact KL(π‖π_ref) per token"),
          ("entropy", "entropy per token"), ("length_mean", "response length"))
ORACLE_CORE = ("k1_as_loss", "k1_in_reward", "k1_in_reward_rtg", "k2_as_loss", "k2_in_reward",
               "k3_as_loss", "k3_in_reward", "k3_value_k2_grad", "k2_as_loss+detached_ratio",
               "k2_as_loss+ratio", "k2_as_loss+clipped", "k3_as_loss+ratio")
BANDIT_TERMS = ("k1_in_reward", "k1_as_loss", "k2_as_loss", "k3_as_loss", "k2_in_reward",
                "k3_in_reward", "k3_value_k2_grad", "k2_as_loss+detached_ratio",
                "k2_as_loss+clipped", "k2_as_loss+ratio", "k3_as_loss+ratio")


NEAREST_TV = 0.05  # a final policy farther (TV) than this from every optimum is near "none"
ALPHA = 0.05  # significance level of the Welch t-tests behind "differs"
REGIME_PI_REF = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6)
REGIME_BETAS = (0.05, 0.1, 0.2, 0.5, 1.0)
VERL_K3 = "k3_as_loss (verl clamp ±10)"
REGIME_TERMS = ("k2_as_loss", "k1_in_reward", "k3_as_loss", "k3_as_loss+ratio", VERL_K3)
REGIME_PAIRS = ("k3_as_loss", "k3_as_loss+ratio", VERL_K3, "k1_in_reward")  # each / k2_as_loss
BEFORE_NORM = "k1_in_reward@before_norm"
STRESS_VARIANTS = ("k2_as_loss", "k3_as_loss")
SEQUENCE_TERMS = ("k2_as_loss", "k3_as_loss", "k1_in_reward_rtg", VERL_K3)
SEQUENCE = {"vocab": 4, "length": 6, "ref_prob_target": 1e-3, "beta": 0.2, "num_samples": 64,
            "learning_rate": 0.05, "grad_clip": 1.0}  # variant@reward_stage (see grpo.REWARD_STAGES)


@dataclasses.dataclass(frozen=True)
class Settings:
  seeds: int
  steps: int
  label: str = "custom"  # "quick" / "full" for the presets
  beta: float = 0.5
  off_policy_epochs: int = 2
  off_policy_minibatches: int = 2
  final_window: int = 30
  oracle_terms: tuple[str, ...] | None = ORACLE_CORE  # None: all of kl_term_names()
  bandit_modes: tuple[str, ...] = ("exact", "sampled")
  bandit_steps: int = 3000
  data_dir: str = "~/.cache/kljax/tfds"
  sft_steps: int = 200
  regime_steps: int = 3000  # bandit regime map: Adam steps per (term, π_ref(best), β, mode)
  sequence_seeds: int = 5  # exact sequence study (kljax.tabular_rl)
  sequence_steps: int = 400
  stress_seeds: int = 2  # stressing GRPO: weak warm start, rare rewards
  stress_steps: int = 100
  stress_sft_steps: int = 30
  stress_learning_rate: float = 2e-3
  stress_variants: tuple[str, ...] = ("k2_as_loss", "k3_as_loss")

  @classmethod
  def quick(cls) -> Settings:
    """The README main job: 2 seeds × 150 steps, the core oracle terms (≤ 10 min on 2 CPUs)."""
    return cls(seeds=2, steps=150, label="quick", sequence_steps=250, stress_steps=80)

  @classmethod
  def full(cls) -> Settings:
    """4 seeds × 400 steps and every KL term in the oracle table."""
    return cls(seeds=4, steps=400, oracle_terms=None, label="full", sequence_seeds=8,
               sequence_steps=400, stress_seeds=4, stress_steps=300, stress_variants=("none", *STRESS_VARIANTS))

  def __post_init__(self):
    for name in ("seeds", "steps", "off_policy_epochs", "off_policy_minibatches", "final_window",
                 "bandit_steps", "sft_steps", "regime_steps", "sequence_seeds", "sequence_steps",
                 "stress_seeds", "stress_steps", "stress_sft_steps"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
    if not (self.beta > 0 and math.isfinite(self.beta)):
      raise ValueError(f"beta must be a finite number > 0, got {self.beta}.")

  def replace(self, **changes) -> Settings:
    return dataclasses.replace(self, **changes)  # validated again by __post_init__


def grpo_config(settings: Settings, term: str, seed: int, *, off_policy: bool,
                stress: bool = False):
  """The GRPO config of one run: the tiny arithmetic setup with β, the term, and the seed.
  `term` may end in "@<reward_stage>". `stress`: the stressing regime — a weak warm start
  (`stress_sft_steps`) from which correct answers are rare, and a larger learning rate."""
  from kljax.train.config import grpo_tiny

  c = grpo_tiny()
  c.seed = seed
  c.num_steps = settings.steps
  c.checkpoint_every = max(settings.steps // 4, 1)
  c.data.data_dir = os.fspath(paths.resolve(settings.data_dir))
  c.sft.steps = settings.sft_steps
  term, _, stage = term.partition("@")
  c.kl.term = term
  c.kl.reward_stage = stage or "after_norm"
  c.kl.beta = settings.beta
  c.mesh.devices = 1
  c.metrics.tensorboard = False
  if stress:
    c.num_steps = settings.stress_steps
    c.checkpoint_every = max(settings.stress_steps // 4, 1)
    c.sft.steps = settings.stress_sft_steps
    c.optim.learning_rate = settings.stress_learning_rate
  if off_policy:
    c.loss.epochs = settings.off_policy_epochs
    c.loss.minibatches = settings.off_policy_minibatches
  return c


# ---------------------------------------------------------------- running


def run_variants(settings: Settings, workdir: str, variants, *, off_policy: bool = False,
                 stress: bool = False, progress: bool = True,
                 trained: list | None = None) -> dict[str, list[list[dict]]]:
  """GRPO for every (variant, seed) from one shared SFT warm start; returns {variant: [history per
  seed]}. A run lives in WORKDIR/grpo/<on_policy|off_policy>/<variant>/seed<k>: an interrupted one
  resumes from its last checkpoint, a finished one is read back, not rerun."""
  from kljax.progress import bar as tqdm  # log lines when not on a terminal

  from kljax.train import grpo
  from kljax.train.metrics import read_jsonl
  from kljax.train.sft import initial_model

  seeds = settings.stress_seeds if stress else settings.seeds
  cfg = lambda v, s: grpo_config(settings, v, s, off_policy=off_policy, stress=stress)
  jobs = [(v, s) for v in variants for s in range(seeds)]
  for variant, seed in jobs:  # every config validates before any work
    grpo.validate(cfg(variant, seed))
  workdir = paths.resolve(workdir)
  init_model = initial_model(cfg("none", 0), workdir / ("sft_stress" if stress else "sft"))
  block = "stress" if stress else "off_policy" if off_policy else "on_policy"
  steps = cfg("none", 0).num_steps
  out: dict[str, list[list[dict]]] = {}
  bar = tqdm(jobs, desc=f"grpo {block.replace('_', '-')} runs", unit="run",
             disable=not progress)
  for variant, seed in bar:
    bar.set_postfix_str(f"{variant} seed {seed}")
    run_dir = workdir / "grpo" / block / variant / f"seed{seed}"
    path = run_dir / "metrics.jsonl"
    if not (path.exists() and len(read_jsonl(path)) >= steps):
      if trained is not None:
        trained.append(run_dir)
      grpo.train(cfg(variant, seed), run_dir,
                 init_model=init_model, progress=progress,
                 bar_options={"desc": f"  {variant} seed {seed}", "leave": False, "position": 1})
    out.setdefault(variant, []).append(read_jsonl(path)[:steps])
  return out


def _final(history: list[dict], metric: str, window: int) -> float:
  values = [row[_COLUMN.get(metric, metric)] for row in history[-window:]]
  return float(np.mean(values))


def seed_std(values) -> float:
  """The sample standard deviation over seeds (ddof = 1); NaN for fewer than two seeds."""
  v = np.asarray(values, np.float64)
  return float(np.std(v, ddof=1)) if v.size >= 2 else float("nan")


def welch(x, y) -> dict[str, float]:
  """Welch's t-test (unequal variances) of two seed samples: {"t", "dof", "p", "n_x", "n_y"}.

  p is two-sided; NaN when either sample has fewer than two seeds, or both have zero spread and
  equal means. Two equal constant samples give p = 1; two different constant samples p = 0.
  """
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  out = {"n_x": float(x.size), "n_y": float(y.size)}
  if x.size < 2 or y.size < 2:
    return out | {"t": float("nan"), "dof": float("nan"), "p": float("nan")}
  vx, vy = x.var(ddof=1) / x.size, y.var(ddof=1) / y.size
  diff = x.mean() - y.mean()
  if vx + vy == 0:
    return out | {"t": float("nan") if diff == 0 else math.copysign(math.inf, diff),
                  "dof": float("nan"), "p": 1.0 if diff == 0 else 0.0}
  from scipy import stats

  t = diff / math.sqrt(vx + vy)
  dof = (vx + vy) ** 2 / (vx**2 / (x.size - 1) + vy**2 / (y.size - 1))
  return out | {"t": float(t), "dof": float(dof), "p": float(2 * stats.t.sf(abs(t), dof))}


def summarize(runs: dict[str, list[list[dict]]], window: int) -> dict[str, dict[str, Any]]:
  """{variant: {metric: mean over seeds of the final value, metric_seed_std: sample std over
  seeds (ddof = 1), metric_seeds: the per-seed finals, seeds}}."""
  out = {}
  for variant, histories in runs.items():
    row: dict[str, Any] = {}
    for m in METRICS:
      finals = [_final(h, m, window) for h in histories]
      row[m] = float(np.mean(finals))
      row[f"{m}_seed_std"] = seed_std(finals)
      row[f"{m}_seeds"] = finals
    row["seeds"] = len(histories)
    out[variant] = row
  return out


def run_means(runs: dict[str, list[list[dict]]], metrics) -> dict[str, dict[str, float]]:
  """{variant: {metric: mean over every step of every seed}} for the metrics the rows carry."""
  out = {}
  for variant, histories in runs.items():
    rows = [row for h in histories for row in h]
    out[variant] = {m: float(np.mean([row[m] for row in rows])) for m in metrics
                    if rows and all(m in row for row in rows)}
  return out


def trajectory_gap(a: list[list[dict]], b: list[list[dict]]) -> list[dict[str, Any]]:
  """Per seed: how long two runs with identical seeds stay together, from their metrics.

  "Together" means the per-step hash of the sampled token arrays (`tokens_hash`) is equal. While no
  sampled token differs the two runs see the same batches, so the relative differences of
  their per-step gradient norms and exact KLs measure how closely their updates agree; once a token
  differs the runs are two samples of the same process.
  """
  def rel(x, y):
    return abs(x - y) / max(abs(x), 1e-30)

  out = []
  for ha, hb in zip(a, b):
    n = min(len(ha), len(hb))
    if any("tokens_hash" not in row for row in ha[:n] + hb[:n]):
      raise ValueError("trajectory_gap compares the sampled tokens: every metrics row needs "
                       "'tokens_hash' (written by kljax.train.grpo since it was added).")
    same = [ha[i]["tokens_hash"] == hb[i]["tokens_hash"] for i in range(n)]
    split = same.index(False) if False in same else n
    grad_gap = [rel(ha[i]["grad_norm"], hb[i]["grad_norm"]) for i in range(n)]
    out.append({"identical_batches_until_step": split, "steps": n,
                "max_rel_grad_norm_gap_while_identical": max(grad_gap[:split], default=float("nan")),
                "median_rel_grad_norm_gap_while_identical":
                    float(np.median(grad_gap[:split])) if split else float("nan"),
                "rel_grad_norm_gap": grad_gap,
                "rel_exact_rkl_gap": [rel(ha[i]["exact_rkl"], hb[i]["exact_rkl"]) for i in range(n)],
                "reward_gap": [abs(ha[i]["reward_mean"] - hb[i]["reward_mean"]) for i in range(n)]})
  return out


def final_param_distance(dir_a: str, dir_b: str) -> float:
  """‖θ_a − θ_b‖ / ‖θ_a‖ between the policies of two runs' latest checkpoints."""
  import jax

  from kljax.train.checkpoint import Checkpointer

  params = []
  for d in (dir_a, dir_b):
    ckpt = Checkpointer(d, every=1)
    try:
      state = ckpt.restore().state  # the newest that verifies
    finally:
      ckpt.close()
    params.append([np.asarray(x, np.float64) for x in jax.tree.leaves(state["params"])])
  diff = math.sqrt(sum(np.sum((x - y) ** 2) for x, y in zip(*params)))
  return diff / math.sqrt(sum(np.sum(x ** 2) for x in params[0]))


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


def plot_regime(regimes: list[dict], term: str, path: str, *, versus: str = "k2_as_loss") -> None:
  """Heat maps (one panel per gradient mode) of log10(final RKL of `term` / that of `versus`)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  modes = [m for m in ("exact", "sampled") if any(r["gradients"] == m for r in regimes)]
  ps = sorted({r["pi_ref_best"] for r in regimes}, reverse=True)
  bs = sorted({r["beta"] for r in regimes})
  fig, axes = plt.subplots(1, len(modes), figsize=(5.6 * len(modes), 4.6), squeeze=False)
  for ax, mode in zip(axes[0], modes):
    get = lambda t: {(r["pi_ref_best"], r["beta"]): r["final_rkl"] for r in regimes
                     if r["term"] == t and r["gradients"] == mode}
    a, b = get(term), get(versus)
    z = np.full((len(ps), len(bs)), np.nan)
    for i, p in enumerate(ps):
      for j, beta in enumerate(bs):
        if max(a[(p, beta)], b[(p, beta)]) > 1e-5:  # else: neither moved (arm never sampled)
          z[i, j] = np.log10(max(a[(p, beta)], 1e-9) / max(b[(p, beta)], 1e-9))
    im = ax.imshow(z, cmap="RdBu_r", vmin=-3, vmax=3, aspect="auto")
    for i in range(len(ps)):
      for j in range(len(bs)):
        ax.text(j, i, "–" if np.isnan(z[i, j]) else f"{10 ** z[i, j]:.3g}", ha="center",
                va="center", fontsize=7,
                color="white" if abs(np.nan_to_num(z[i, j])) > 1.8 else "black")
    ax.set_xticks(range(len(bs)), [f"{x:g}" for x in bs])
    ax.set_yticks(range(len(ps)), [f"{x:g}" for x in ps])
    ax.set_xlabel("β (KL coefficient; reward 1 on the rewarded arm)")
    ax.set_ylabel("π_ref(rewarded arm)")
    ax.set_title(f"{mode} gradients")
    fig.colorbar(im, ax=ax, label="log10 (final KL(π‖π_ref) ratio)")
  fig.suptitle(f"{term} / {versus}: final reverse KL ratio (red: {term} drifts further from "
               f"π_ref; –: neither moved)", fontsize=10)
  fig.tight_layout()
  paths.save_figure(fig, path, dpi=100)
  plt.close(fig)


def regime_file(term: str) -> str:
  return "regime_" + "".join(ch if ch.isalnum() else "_" for ch in term).strip("_") + ".png"


def spikes(grad_norms, factor: float = 5.0) -> int:
  """Steps whose gradient norm exceeds `factor` × the run's median gradient norm."""
  g = np.asarray(grad_norms, np.float64)
  return int(np.sum(g > factor * np.median(g))) if g.size else 0


def run_sequence_study(settings: Settings, workdir: str, *, progress: bool = True) -> dict:
  """The exact sequence study (`kljax.tabular_rl`) and the gradient noise of k2 vs k3 along its
  trajectories; cached in WORKDIR/sequence.json (resumable like the GRPO runs)."""
  import jax

  from kljax import exact, tabular_rl

  path = paths.resolve(workdir) / "sequence.json"
  key = {"seeds": settings.sequence_seeds, "steps": settings.sequence_steps, **SEQUENCE}
  if path.exists():
    cached = json.loads(path.read_text())
    if cached.get("key") == key:
      return cached
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
  paths.write_atomic(path, json.dumps(out))
  return out


def plot_sequence(seq: dict, path: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  panels = (("rkl", "exact sequence KL(π‖π_ref) (nats)"), ("target_prob", "π(y*)"),
            ("grad_norm", "gradient norm before clipping"),
            ("max_abs_log_delta", "max |log δ| on sampled tokens"))
  fig, axes = plt.subplots(1, 4, figsize=(19, 3.8))
  for ax, (m, label) in zip(axes, panels):
    for i, (name, c) in enumerate(seq["curves"].items()):
      y = np.asarray(c[m])
      mean, sd = y.mean(0), y.std(0, ddof=1) if y.shape[0] > 1 else 0 * y[0]
      ax.plot(mean, color=f"C{i}", label=name, lw=1.3, ls=("-", "--", ":", "-.")[i % 4])
      ax.fill_between(np.arange(y.shape[1]), mean - sd, mean + sd, color=f"C{i}", alpha=0.15)
    if m == "target_prob":
      ax.axhline(seq["optimum_target_prob"], color="k", lw=0.8, ls=":", label="π*(y*) (RKL opt.)")
    ax.set_title(label, fontsize=10)
    ax.set_xlabel("optimizer step")
    ax.grid(alpha=0.3)
  axes[1].legend(fontsize=8)
  fig.suptitle(f"Exact sequences: V = {seq['vocab']}, T = {seq['length']}, reward 1 on y* with "
               f"π_ref(y*) = {seq['ref_prob_target']:.1e}, β = {seq['beta']:g}; mean ± sample std "
               f"over {len(next(iter(seq['terms'].values()))['final_rkl_seeds'])} seeds", fontsize=10)
  fig.tight_layout()
  paths.save_figure(fig, path, dpi=100)
  plt.close(fig)


def plot_noise(seq: dict, path: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6.5, 3.8))
  half = len(seq["noise_steps"]) // 2
  for i, name in enumerate(("k2_as_loss", "k3_as_loss")):
    y = np.asarray(seq["noise"][name])
    for j, (src, ls) in enumerate((("k2_as_loss", "-"), ("k3_as_loss", "--"))):
      ax.semilogy(seq["noise_steps"][j * half:(j + 1) * half], y[j * half:(j + 1) * half],
                  color=f"C{i}", ls=ls, marker="o", ms=3,
                  label=f"{name} gradient, at {src}'s policies")
  ax.set_xlabel("optimizer step of the trajectory")
  ax.set_ylabel("std / ‖E g‖ of the sampled KL gradient")
  ax.set_title(f"Noise of the KL gradient, {seq['noise_samples']} sequences a batch "
               f"(lower is steadier)", fontsize=10)
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=7)
  fig.tight_layout()
  paths.save_figure(fig, path, dpi=100)
  plt.close(fig)


def stability(runs: dict[str, list[list[dict]]], window: int) -> dict[str, dict[str, float]]:
  """Per variant: max per-step exact KL (over seeds), gradient-norm spikes (all seeds), seeds whose
  final entropy fell below 10% of their step-0 entropy (collapse), and the largest log π/π_ref of a
  sampled completion."""
  out = {}
  for v, hs in runs.items():
    out[v] = {"max_step_rkl": max(r["exact_rkl"] for h in hs for r in h),
              "spikes": sum(spikes([r["grad_norm"] for r in h]) for h in hs),
              "collapsed": sum(_final(h, "entropy", window) < 0.1 * h[0]["entropy"] for h in hs),
              "max_seq_log_ratio": max(r.get("max_seq_log_ratio", float("nan"))
                                       for h in hs for r in h)}
  return out


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
              "before_norm_seed_std": b[f"{m}_seed_std"], "p": _test(b, a, m)["p"]}
          for m in ("exact_rkl", "reward", "entropy")}


# ---------------------------------------------------------------- verdicts


def _ms(row: dict, metric: str) -> str:
  return f"{row[metric]:.4f} ± {row[f'{metric}_seed_std']:.4f}"


def _test(x: dict, y: dict, metric: str) -> dict[str, float]:
  return welch(x[f"{metric}_seeds"], y[f"{metric}_seeds"])


def _differs(x: dict, y: dict, metric: str) -> bool:
  """Welch's t-test over the seeds rejects equal means at level ALPHA (False when untestable)."""
  p = _test(x, y, metric)["p"]
  return bool(p < ALPHA)


def _pstr(x: dict, y: dict, metric: str) -> str:
  w = _test(x, y, metric)
  if math.isnan(w["p"]):
    return f"untestable with {int(w['n_x'])} vs {int(w['n_y'])} seed(s)"
  return f"Welch t-test p = {w['p']:.2g}, {int(w['n_x'])} vs {int(w['n_y'])} seeds"


def nearest_optimum(distances: dict[str, float], threshold: float = NEAREST_TV) -> str:
  """The key of the smallest TV distance, or "none" when even that is ≥ `threshold`."""
  key = min(distances, key=distances.get)
  return key if distances[key] < threshold else "none"


def identical_batches_check(gaps: list[dict], param_gaps: list[float], *,
                            tol: float = 1e-4) -> list[bool]:
  """Per seed, whether two runs behaved as the same gradient would make them: runs whose sampled
  tokens never part end within `tol` (relative parameter distance); runs that part agree to `tol`
  (median relative grad-norm gap) while the tokens are the same. Runs whose tokens differ from
  step 0 share no batch, so nothing about their gradients was checked: they fail."""
  out = []
  for g, d in zip(gaps, param_gaps, strict=True):
    split, n = g["identical_batches_until_step"], g["steps"]
    if split == n:
      out.append(bool(d < tol))
    else:
      out.append(bool(split > 0 and g["median_rel_grad_norm_gap_while_identical"] < tol))
  return out


def regime_boundary(regimes: list[dict], term: str, *, versus: str = "k2_as_loss",
                    gradients: str = "exact", factor: float = 10.0,
                    min_gap: float = 0.1) -> dict[float, list[float]]:
  """Per β: the π_ref(best) of the grid (largest first) where `term` ends with ≥ `factor` × and
  ≥ `min_gap` nats more final reverse KL than `versus` — materially weaker regularization."""
  def table(t):
    return {(r["pi_ref_best"], r["beta"]): r["final_rkl"] for r in regimes
            if r["term"] == t and r["gradients"] == gradients}

  a, b = table(term), table(versus)
  out: dict[float, list[float]] = {}
  for beta in sorted({k[1] for k in a}):
    ps = sorted((p for p, bb in a if bb == beta), reverse=True)
    out[beta] = [p for p in ps if a[(p, beta)] >= factor * b[(p, beta)]
                 and a[(p, beta)] - b[(p, beta)] >= min_gap]
  return out


def verdicts(oracle_rows, bandit_runs: dict, grpo: dict, off: dict, gaps: list[dict],
             param_gaps: list[float], extra: dict | None = None) -> dict:
  """One {"verdict", "evidence"} per claim, from the measurements only. `extra` holds the optional
  studies: "regimes" (records), "sequence", "stress", "off_policy_means",
  "warm_max_seq_log_ratio"."""
  o = {(r.setting, r.term): r for r in oracle_rows}
  on_tok, on_seq = "one token, on-policy", "sequence, per-token terms, on-policy"
  off_tok, off_seq = "one token, off-policy", "sequence, per-token terms, off-policy"
  out = {}

  # 1. k1 as loss: no regularization.
  k1, none, k2 = grpo["k1_as_loss"], grpo["none"], grpo["k2_as_loss"]
  zero_grad = o[(on_tok, "k1_as_loss")].grad_norm
  bandit_k1 = bandit_runs.get("k1_as_loss", {}).get("nearest")
  like_none = not _differs(k1, none, "exact_rkl")
  k2_regularizes = k2["exact_rkl"] < none["exact_rkl"] and _differs(k2, none, "exact_rkl")
  confirmed = zero_grad < 1e-6 and bandit_k1 == "tv_zero" and like_none
  others = "; ".join(
      f"{m} {k1[m]:.4f} vs {none[m]:.4f} (difference {k1[m] - none[m]:+.4f}, {_pstr(k1, none, m)})"
      for m in ("reward", "entropy"))
  out["1_k1_as_loss_no_regularization"] = {
      "verdict": (("confirmed" if k2_regularizes else
                   f"confirmed exactly (oracle, bandit); the GRPO runs ({k1['seeds']} seeds) cannot "
                   f"separate k2_as_loss from no KL either") if confirmed else
                  "partly confirmed" if zero_grad < 1e-6 else "refuted"),
      "evidence": (
          f"Exact expected gradient of k1_as_loss on-policy: norm {zero_grad:.1e}. Bandit: it ends "
          f"nearest the {_OPTIMUM.get(bandit_k1, bandit_k1)}. GRPO final exact KL(π‖π_ref): "
          f"k1_as_loss {_ms(k1, 'exact_rkl')}, no KL {_ms(none, 'exact_rkl')}, k2_as_loss "
          f"{_ms(k2, 'exact_rkl')}: the KL of k1_as_loss "
          f"{'does not differ detectably from' if like_none else 'differs from'} that of no KL "
          f"({_pstr(k1, none, 'exact_rkl')})"
          f"{'' if k2_regularizes else ', but k2_as_loss did not measurably lower the KL either, so this run cannot separate them'}. "
          f"Other end points of k1_as_loss vs no KL: {others}."
      )}

  # 2. k2 as loss ≡ k1 in reward on-policy.
  # both within d of the same exact gradient: within 2d of each other (triangle inequality)
  dist = o[(on_seq, "k2_as_loss")].to_frozen + o[(on_seq, "k1_in_reward")].to_frozen
  max_grad_gap = max((g["max_rel_grad_norm_gap_while_identical"] for g in gaps
                      if g["identical_batches_until_step"] > 0), default=float("nan"))
  median_gap = max((g["median_rel_grad_norm_gap_while_identical"] for g in gaps
                    if g["identical_batches_until_step"] > 0), default=float("nan"))
  splits = [g["identical_batches_until_step"] for g in gaps]
  n = gaps[0]["steps"]
  # Same gradients: runs that never part end with the same parameters up to float rounding; runs
  # that part agree (typically) to rounding while their batches are the same.
  per_seed = identical_batches_check(gaps, param_gaps)
  equal = dist < 1e-5 and all(per_seed)
  agreed = (f"their gradient norms agreed to {median_gap:.1e} relative (the largest per-seed "
            f"median; largest single step {max_grad_gap:.1e})")
  if not all(splits):
    together = (f"the two runs' sampled tokens differ from step 0 in seed(s) "
                f"{', '.join(str(i) for i, x in enumerate(splits) if not x)} (per-step token "
                f"hashes): those seeds share no batch, so they check nothing and fail")
  elif all(split == n for split in splits):
    together = (f"the two runs sampled identical batches (equal per-step token hashes) for all {n} steps of every seed, "
                f"{agreed}, and their final policies differ by "
                f"{', '.join(f'{d:.1e}' for d in param_gaps)} (relative parameter distance, of the order "
                f"of float32 rounding)")
  else:
    together = (f"the two runs sampled identical batches until step "
                f"{', '.join(map(str, splits))} (per seed, of {n}; per-step token hashes); until "
                f"then {agreed}; from there they are two samples of the same process")
  out["2_k2_as_loss_equals_k1_in_reward"] = {
      "verdict": "confirmed" if equal else "refuted",
      "evidence": (
          f"Oracle (sequences, per-token terms, on-policy): both follow the frozen-prefix ∇RKL to "
          f"{max(o[(on_seq, 'k2_as_loss')].to_frozen, o[(on_seq, 'k1_in_reward')].to_frozen):.1e} "
          f"(relative). GRPO with identical seeds: {together}. Final exact KL "
          f"{_ms(k2, 'exact_rkl')} vs {_ms(grpo['k1_in_reward'], 'exact_rkl')}, reward "
          f"{_ms(k2, 'reward')} vs {_ms(grpo['k1_in_reward'], 'reward')}."
      )}

  out["3_k3_as_loss_weaker_than_k2"] = _claim3(o, bandit_runs, grpo, extra or {})

  # 4. Off-policy: as-loss biased without correction; the corrections remove the bias.
  bias = o[(off_tok, "k2_as_loss")].to_rkl
  fixed = {c: o[(off_tok, c)].to_rkl for c in OFF_POLICY[1:] if (off_tok, c) in o}
  exact_fixes = [c for c, d in fixed.items() if d < 1e-4]
  seq_fixes = [c for c in OFF_POLICY[1:] if (off_seq, c) in o and o[(off_seq, c)].to_frozen < 1e-4]
  grpo_effect = [c for c in OFF_POLICY[1:] if c in off and _differs(off[c], off["k2_as_loss"],
                                                                     "exact_rkl")]
  means = (extra or {}).get("off_policy_means", {})
  why = []
  for c in grpo_effect:
    if c.endswith("+clipped") and "kl_grad_zeroed_fraction" in means.get(c, {}):
      why.append(f"The clipped head removed the KL gradient of "
                 f"{100 * means[c]['kl_grad_zeroed_fraction']:.2f}% of the tokens (mean over "
                 f"updates and seeds; tokens with π ≠ π_ref whose KL-term gradient was exactly 0).")
    if c.endswith("+ratio") and (off_tok, c) in o:
      why.append(f"`{c}` is itself biased: {o[(off_tok, c)].to_rkl:.1e} (relative) from ∇RKL in "
                 f"the oracle.")
  clipped = [c for c in OFF_POLICY if c.endswith("+clipped") and c not in grpo_effect
             and "kl_grad_zeroed_fraction" in means.get(c, {})]
  why += [f"`{c}` removed the KL gradient of {100 * means[c]['kl_grad_zeroed_fraction']:.2f}% of "
          f"the tokens (mean over updates and seeds)." for c in clipped]
  drift = ", ".join(f"{c} {means[c]['ppo_kl']:.1e}" for c in OFF_POLICY if "ppo_kl" in
                    means.get(c, {}))
  out["4_off_policy_correction"] = {
      "verdict": ("confirmed" if bias > 1e-3 and exact_fixes else "refuted") + (
          "" if grpo_effect else " (exactly; the GRPO runs show no end-point difference)"),
      "evidence": (
          f"Oracle, one token with π_old ≠ π: uncorrected k2_as_loss is {bias:.1e} (relative) from "
          f"∇RKL; " + ", ".join(f"{c} {d:.1e}" for c, d in fixed.items()) + ". For sequences with "
          f"per-token ratios the exact ones ({', '.join(seq_fixes) or 'none'}) follow the "
          f"frozen-prefix ∇RKL with prefixes from π_old. GRPO off-policy final exact KL: " +
          ", ".join(f"{c} {_ms(off[c], 'exact_rkl')} ({_pstr(off[c], off['k2_as_loss'], 'exact_rkl')})"
                    if c != "k2_as_loss" else f"{c} {_ms(off[c], 'exact_rkl')}"
                    for c in OFF_POLICY if c in off) + ". "
          + ("Differences at p < 0.05: " + ", ".join(
              f"{c} ({'higher' if off[c]['exact_rkl'] > off['k2_as_loss']['exact_rkl'] else 'lower'}"
              f" KL than uncorrected)" for c in grpo_effect) + ". " + " ".join(why)
             if grpo_effect else "No correction changed the end point detectably (p ≥ 0.05). "
             + " ".join(why))
          + (f" Mean per-token KL between π_old and the updated π within a rollout (ppo_kl): "
             f"{drift}." if drift else "")
      )}
  return out


def _claim3(o, bandit_runs: dict, grpo: dict, extra: dict) -> dict:
  """Claim 3 per regime: the warm-start GRPO runs (RL sharpens a mode the reference covers), the
  bandit regime map (mass the reference barely covers), exact sequences, gradient noise, and the
  stressing GRPO runs — each part only when measured."""
  on_tok, on_seq = "one token, on-policy", "sequence, per-token terms, on-policy"
  k2, k3 = grpo["k2_as_loss"], grpo["k3_as_loss"]
  theory = (o[(on_tok, "k3_as_loss")].to_fkl < 1e-4
            and o[(on_seq, "k3_as_loss")].follows == "frozen-prefix ∇FKL")
  parts = [
      f"Oracle: k3_as_loss follows ∇FKL exactly for one token "
      f"({o[(on_tok, 'k3_as_loss')].to_fkl:.1e}) and, for sequences, the frozen-prefix ∇FKL "
      f"({o[(on_seq, 'k3_as_loss')].to_frozen_fkl:.1e}; distance "
      f"{o[(on_seq, 'k3_as_loss')].to_rkl:.2f} from the sequence ∇RKL). Random bandit: it ends "
      f"nearest the {_OPTIMUM.get(bandit_runs.get('k3_as_loss', {}).get('nearest'), '?')}."]
  found = {}  # regime -> "weaker" | "closer" | "no difference" (k3 vs k2)

  def side(x, y, metric):
    if not _differs(x, y, metric):
      return "no difference"
    return "weaker" if x[metric] > y[metric] else "closer"

  found["warm-start GRPO (sharpening a covered mode)"] = side(k3, k2, "exact_rkl")
  parts.append(
      f"Warm-start GRPO (k3_as_loss vs k2_as_loss, final): exact KL {_ms(k3, 'exact_rkl')} vs "
      f"{_ms(k2, 'exact_rkl')} ({_pstr(k3, k2, 'exact_rkl')}); entropy {k3['entropy']:.4f} vs "
      f"{k2['entropy']:.4f}; largest log π/π_ref of a sampled completion "
      f"{extra.get('warm_max_seq_log_ratio', float('nan')):.2f} nats.")
  regimes = extra.get("regimes")
  if regimes:
    bound = regime_boundary(regimes, "k3_as_loss")
    k2x = {(r["pi_ref_best"], r["beta"]): r["final_rkl"] for r in regimes
           if r["gradients"] == "exact" and r["term"] == "k2_as_loss"}
    k3x = {(r["pi_ref_best"], r["beta"]): r["final_rkl"] for r in regimes
           if r["gradients"] == "exact" and r["term"] == "k3_as_loss"}
    worst = max(k3x, key=lambda k: k3x[k] - k2x[k])
    onset = [b * math.log(1 / ps[0]) for b, ps in bound.items() if ps]
    found["bandit, rewarded arm rare under π_ref"] = (
        "weaker" if any(bound.values()) else "no difference")
    parts.append(
        "Bandit regime map (exact gradients, reward 1 on one arm): k3_as_loss ends with ≥ 10× "
        "and ≥ 0.1 nats more reverse KL than k2_as_loss at " + "; ".join(
            f"β = {b:g}: π_ref(best) = {', '.join(f'{p:g}' for p in ps) or 'nowhere'}"
            + (f" (largest: ln 1/π_ref = {math.log(1 / ps[0]):.1f} vs 1/β = {1 / b:.1f})"
               if ps else "") for b, ps in bound.items())
        + f". Largest gap at π_ref(best) = {worst[0]:g}, β = {worst[1]:g}: {k3x[worst]:.3g} vs "
        f"{k2x[worst]:.3g} nats. In units of β·ln(1/π_ref(best)) (reward 1) the largest "
        f"π_ref(best) of each β's set lies at " + ", ".join(
            f"{b * math.log(1 / ps[0]):.2f} (β = {b:g})" for b, ps in bound.items() if ps)
        + (f": a run is in this regime when the completions it must learn have ln(1/π_ref) "
           f"above about {min(onset):.1f}/β to {max(onset):.1f}/β nats." if onset else "."))
  seq = extra.get("sequence")
  if seq:
    a, b = seq["terms"]["k3_as_loss"], seq["terms"]["k2_as_loss"]
    w = welch(a["final_rkl_seeds"], b["final_rkl_seeds"])
    res = ("no difference" if not w["p"] < ALPHA else
           "weaker" if np.mean(a["final_rkl_seeds"]) > np.mean(b["final_rkl_seeds"]) else "closer")
    found["exact sequences, rewarded sequence rare under π_ref"] = res
    parts.append(
        f"Exact sequences (V = {seq['vocab']}, T = {seq['length']}, π_ref(y*) = "
        f"{seq['ref_prob_target']:.1e}, β = {seq['beta']:g}, {len(b['final_rkl_seeds'])} seeds): "
        f"final sequence KL(π‖π_ref) k3_as_loss {np.mean(a['final_rkl_seeds']):.3f} ± "
        f"{seed_std(a['final_rkl_seeds']):.3f} vs k2_as_loss {np.mean(b['final_rkl_seeds']):.3f} ± "
        f"{seed_std(b['final_rkl_seeds']):.3f} (Welch p = {w['p']:.2g}); largest per-step KL "
        f"{a['max_rkl']:.3f} vs {b['max_rkl']:.3f}; gradient-norm spikes (> 5× the run's median) "
        f"{a['spikes']} vs {b['spikes']}; max |log δ| on sampled tokens {a['max_abs_log_delta']:.1f} "
        f"vs {b['max_abs_log_delta']:.1f}.")
    if "noise" in seq:
      n3, n2 = seq["noise"]["k3_as_loss"], seq["noise"]["k2_as_loss"]
      parts.append(
          f"Gradient noise of the sampled KL gradient (std/‖E g‖, median along the trajectories, "
          f"{seq['noise_samples']} sequences a batch): k3_as_loss {np.median(n3):.3g} vs "
          f"k2_as_loss {np.median(n2):.3g}.")
      found["gradient noise"] = ("weaker" if np.median(n3) > 1.5 * np.median(n2) else
                                 "closer" if np.median(n3) < np.median(n2) / 1.5 else
                                 "no difference")
  stress = extra.get("stress")
  if stress:
    a, b = stress["summary"]["k3_as_loss"], stress["summary"]["k2_as_loss"]
    found["stressing GRPO (weak warm start)"] = side(a, b, "exact_rkl")
    st = stress["stability"]
    parts.append(
        f"Stressing GRPO ({stress['description']}): final exact KL k3_as_loss {_ms(a, 'exact_rkl')} "
        f"vs k2_as_loss {_ms(b, 'exact_rkl')} ({_pstr(a, b, 'exact_rkl')}); reward "
        f"{_ms(a, 'reward')} vs {_ms(b, 'reward')}; largest per-step exact KL (max over seeds) "
        f"{st['k3_as_loss']['max_step_rkl']:.3f} vs {st['k2_as_loss']['max_step_rkl']:.3f}; "
        f"grad-norm spikes {st['k3_as_loss']['spikes']} vs {st['k2_as_loss']['spikes']}; collapsed "
        f"seeds {st['k3_as_loss']['collapsed']} vs {st['k2_as_loss']['collapsed']}; largest log "
        f"π/π_ref of a sampled completion {st['k3_as_loss']['max_seq_log_ratio']:.1f} vs "
        f"{st['k2_as_loss']['max_seq_log_ratio']:.1f} nats.")
  weaker = [k for k, v in found.items() if v == "weaker"]
  not_weaker = [f"{k}: {'k3 kept π closer' if v == 'closer' else 'no detectable difference'}"
                for k, v in found.items() if v != "weaker"]
  if not theory:
    verdict = "refuted (the oracle does not find k3_as_loss following ∇FKL)"
  elif weaker and not not_weaker:
    verdict = "confirmed in every regime measured"
  elif weaker:
    verdict = (f"regime-dependent: confirmed in {'; '.join(weaker)}; not reproduced in "
               f"{'; '.join(not_weaker)}")
  else:
    verdict = f"theory confirmed; the practical claim is not reproduced ({'; '.join(not_weaker)})"
  return {"verdict": verdict, "evidence": " ".join(parts), "regimes": found}


_OPTIMUM = {"tv_star": "reverse-KL optimum π*", "tv_fkl": "forward-KL optimum",
            "tv_zero": "β=0 optimum (no regularization)",
            "none": f"none of the three optima (TV ≥ {NEAREST_TV} from each)"}


# ---------------------------------------------------------------- figures and report


def plot_curves(runs: dict[str, list[list[dict]]], path: str, title: str, smooth: int = 15) -> None:
  """Mean over seeds (moving average over `smooth` steps) with a ±1 std band, one panel a metric."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, len(CURVES), figsize=(4.6 * len(CURVES), 3.6))
  kernel = np.ones(smooth) / smooth
  for ax, (metric, label) in zip(axes, CURVES):
    for i, (variant, histories) in enumerate(runs.items()):
      y = np.array([[row[metric] for row in h] for h in histories])  # [seeds, steps]
      if y.shape[1] >= smooth:
        y = np.stack([np.convolve(r, kernel, mode="valid") for r in y])
      x = np.arange(y.shape[1]) + (smooth - 1 if y.shape[1] else 0)
      mean, std = y.mean(0), y.std(0)
      ax.plot(x, mean, label=variant, color=f"C{i}", lw=1.4, ls=("-", "--", ":", "-.")[i % 4])
      ax.fill_between(x, mean - std, mean + std, color=f"C{i}", alpha=0.12)
    ax.set_title(label)
    ax.set_xlabel("GRPO step")
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=8)
  fig.suptitle(title)
  fig.tight_layout()
  paths.save_figure(fig, path, dpi=100)
  plt.close(fig)


def plot_trajectory(gaps: list[dict], path: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
  for seed, g in enumerate(gaps):
    for ax, key in zip(axes, ("rel_grad_norm_gap", "rel_exact_rkl_gap")):
      ax.semilogy(np.maximum(g[key], 1e-9), label=f"seed {seed}", lw=0.9, color=f"C{seed}")
      if g["identical_batches_until_step"] < g["steps"]:
        ax.axvline(g["identical_batches_until_step"], color=f"C{seed}", ls=":", lw=1)
  axes[0].set_title("relative gap of the gradient norms")
  axes[1].set_title("relative gap of exact KL(π‖π_ref)")
  fig.suptitle("k2_as_loss vs k1_in_reward, identical seeds (dotted: first differing batch)")
  for ax in axes:
    ax.set_xlabel("GRPO step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  paths.save_figure(fig, path, dpi=100)
  plt.close(fig)


def grpo_table(summary: dict) -> str:
  """A markdown table of `summarize` output: final metrics, mean ± std over seeds."""
  lines = ["| variant | reward | exact KL(π‖π_ref) | exact KL(π_ref‖π) | entropy | reward std "
           "| length std | seeds |", "|---|---|---|---|---|---|---|---|"]
  for v, row in summary.items():
    lines.append(f"| `{v}` | " + " | ".join(_ms(row, m) for m in METRICS) + f" | {row['seeds']} |")
  return "\n".join(lines) + "\n"


def _bandit_table(bandit_summary: dict) -> str:
  lines = ["| KL term | gradients | TV to π* | TV to forward-KL opt. | TV to β=0 opt. | nearest |",
           "|---|---|---|---|---|---|"]
  for key, d in bandit_summary.items():
    term, mode = key.split(" @ ")
    lines.append(f"| `{term}` | {mode} | {d['tv_star']:.2e} | {d['tv_fkl']:.2e} | "
                 f"{d['tv_zero']:.2e} | {_OPTIMUM[d['nearest']]} |")
  return "\n".join(lines) + "\n"


def _regime_section(results: dict) -> list[str]:
  regimes = results.get("regimes")
  if not regimes:
    return []
  bs = sorted({r["beta"] for r in regimes})
  lines = ["## Claim 3 where it can fail: the bandit regime map", "",
           "Reward 1 on one arm of 10 and 0 on the others; that arm's reference probability "
           "π_ref(best) and β swept; Adam from π = π_ref (exact gradients, and 64 sampled arms a "
           "step with the same seeds for every term). Small π_ref(best) is the regime where RL "
           "must move mass the reference barely covers (δ = π_ref/π → 0 on that arm).", "",
           "Where each term regularizes materially more weakly than k2_as_loss: the π_ref(best) "
           "at which its final KL(π‖π_ref) is ≥ 10× and ≥ 0.1 nats above that of k2_as_loss "
           "(exact gradients); e^(−1/β) for comparison.", "",
           "| term | " + " | ".join(f"β = {b:g}" for b in bs) + " |",
           "|---|" + "---|" * len(bs), "| e^(−1/β) | " + " | ".join(
               f"{math.exp(-1 / b):.1e}" for b in bs) + " |"]
  for term in REGIME_PAIRS:
    bound = regime_boundary(regimes, term)
    lines.append(f"| `{term}` | " + " | ".join(
        ", ".join(f"{p:g}" for p in bound[b]) or "none" for b in bs) + " |")
  lines += ["", "Final KL(π‖π_ref) (nats), exact gradients:", "",
            "| π_ref(best) | β | " + " | ".join(f"`{t}`" for t in REGIME_TERMS) + " |",
            "|---|---|" + "---|" * len(REGIME_TERMS)]
  table = {(r["term"], r["pi_ref_best"], r["beta"]): r for r in regimes if r["gradients"] ==
           "exact"}
  for p in sorted({r["pi_ref_best"] for r in regimes}, reverse=True):
    for b in bs:
      lines.append(f"| {p:g} | {b:g} | " + " | ".join(
          f"{table[(t, p, b)]['final_rkl']:.3g}" for t in REGIME_TERMS) + " |")
  lines.append("")
  for term in REGIME_PAIRS:
    lines += [f"![{term} vs k2_as_loss]({regime_file(term)})", ""]
  return lines


def _sequence_section(results: dict) -> list[str]:
  seq = results.get("sequence")
  if not seq:
    return []
  lines = ["## Claim 3 in exact sequences", "",
           f"Tabular autoregressive policies, V = {seq['vocab']}, T = {seq['length']} "
           f"({seq['vocab'] ** seq['length']} sequences, enumerated), reward 1 on one sequence y* "
           f"with π_ref(y*) = {seq['ref_prob_target']:.1e}, β = {seq['beta']:g}; "
           f"{seq['noise_samples']} sampled sequences a step, leave-one-out baseline, per-token "
           f"KL term summed over tokens, Adam after global-norm clipping at 1, from π = π_ref. "
           f"The reverse-KL optimum has π*(y*) = {seq['optimum_target_prob']:.3f}. Sequence KLs "
           f"are exact at every step; ± is the sample std over seeds.", "",
           "| term | final KL(π‖π_ref) | final KL(π_ref‖π) | final π(y*) | largest KL(π‖π_ref) "
           "on the way | grad-norm spikes (> 5× median) | max grad norm | max abs log δ |",
           "|---|---|---|---|---|---|---|---|"]
  for name, t in seq["terms"].items():
    ms = lambda k: f"{np.mean(t[k]):.3f} ± {seed_std(t[k]):.3f}"
    lines.append(f"| `{name}` | {ms('final_rkl_seeds')} | {ms('final_fkl_seeds')} | "
                 f"{ms('final_target_prob_seeds')} | {t['max_rkl']:.3f} | {t['spikes']} | "
                 f"{t['max_grad_norm']:.3g} | {t['max_abs_log_delta']:.1f} |")
  lines += ["", "![sequence study](sequence_study.png)", "",
            f"Gradient noise: std/‖E g‖ of the sampled KL-term gradient ({seq['noise_samples']} "
            f"sequences a batch, 256 batches), k2_as_loss and k3_as_loss evaluated at the same "
            f"policies (every 25 steps of both trajectories, seed 0): median "
            f"{np.median(seq['noise']['k2_as_loss']):.3g} (k2) vs "
            f"{np.median(seq['noise']['k3_as_loss']):.3g} (k3); the k3/k2 ratio per policy ranges "
            f"{np.min(np.divide(seq['noise']['k3_as_loss'], seq['noise']['k2_as_loss'])):.2f}–"
            f"{np.max(np.divide(seq['noise']['k3_as_loss'], seq['noise']['k2_as_loss'])):.2f}.",
            "", "![gradient noise](gradient_noise.png)", ""]
  return lines


def _stress_section(results: dict) -> list[str]:
  st = results.get("grpo_stress")
  if not st:
    return []
  lines = ["## Claim 3 in a stressing GRPO regime", "", f"{st['description']}: correct answers "
           "are rare at the start, so the policy must move mass to completions the reference "
           "rarely produces.", "", grpo_table(st["summary"]),
           "| variant | largest per-step exact KL | grad-norm spikes (> 5× median) | collapsed "
           "seeds (entropy < 10% of step 0) | largest log π/π_ref of a completion (nats) |",
           "|---|---|---|---|---|"]
  for v, x in st["stability"].items():
    lines.append(f"| `{v}` | {x['max_step_rkl']:.4f} | {x['spikes']} | {x['collapsed']} | "
                 f"{x['max_seq_log_ratio']:.2f} |")
  return lines + ["", "![stress curves](grpo_stress.png)", ""]


def _stage_section(results: dict) -> list[str]:
  e = results.get("reward_stage")
  if not e:
    return []
  return ["## Where the in-reward KL enters GRPO", "",
          "`k1_in_reward` (kljax default, `kl.reward_stage=\"after_norm\"`: β·k1 per token after "
          "the group normalization, token credit) vs `k1_in_reward@before_norm` (verl's order: "
          "β·Σ_t k1 leaves the reward before the group mean/std, whole-sequence credit, β "
          "effectively β/σ_g). Final values, mean ± sample std over seeds, Welch p:", "",
          "| metric | after_norm | before_norm | p |", "|---|---|---|---|"] + [
          f"| {m} | {x['after_norm']:.4f} ± {x['after_norm_seed_std']:.4f} | "
          f"{x['before_norm']:.4f} ± {x['before_norm_seed_std']:.4f} | {x['p']:.2g} |"
          for m, x in e.items()] + [""] + ([
          "What each follows, for sequences on-policy (`kljax.audit`, exact enumeration): " +
          "; ".join(f"{k}: {v}" for k, v in results["reward_stage_audit"].items()) + ". "
          "before_norm's KL gradient is further divided by the group's std σ_g, which changes "
          "from group to group.", ""] if results.get("reward_stage_audit") else [])


def write_report(path: str, settings: Settings, results: dict, oracle_md: str, elapsed: float):
  v = results["verdicts"]
  claims = {
      "1_k1_as_loss_no_regularization": "k1 as loss gives no regularization",
      "2_k2_as_loss_equals_k1_in_reward": "k2 as loss is gradient-equivalent to k1 in reward "
                                          "on-policy (Thm 5.1)",
      "3_k3_as_loss_weaker_than_k2": "k3 as loss is a biased approximation that regularizes more "
                                     "weakly and less stably than k2",
      "4_off_policy_correction": "off-policy, KL-as-loss is biased without importance sampling; "
                                 "the corrections remove the bias",
  }
  meta = results["meta"]
  text = [
      "# Reproducing Liu et al., *Rethinking KL Regularization in RLHF* (arXiv:2510.01555)", "",
      f"Settings `{settings.label}`: GRPO on single-digit arithmetic with the "
      f"`tiny` preset from a {settings.sft_steps}-step supervised warm start, β = {settings.beta}, "
      f"{settings.steps} steps × 64 completions, {settings.seeds} seed(s) per variant (the same "
      f"seeds for every variant); off-policy runs take {settings.off_policy_epochs} epochs × "
      f"{settings.off_policy_minibatches} minibatches per rollout. Final values are means over the "
      f"last {settings.final_window} steps, shown as mean ± sample std (ddof = 1) over seeds; "
      f"\"differs\" means a two-sided Welch t-test over the seeds gives p < {ALPHA} (with "
      f"{settings.seeds} seeds a test of little power: a large p is no evidence of equality). "
      f"Total time "
      f"{elapsed / 60:.1f} min on {meta['machine']}" + (
          f" (this invocation; {meta['grpo_runs_read_back']} GRPO runs and any cached sequence "
          f"study were read back from an earlier invocation of the same command)"
          if meta.get("grpo_runs_read_back") else "") + ".", "",
      "## Verdicts", "",
  ]
  for key, claim in claims.items():
    text += [f"**{key[0]}. {claim}: {v[key]['verdict']}.** {v[key]['evidence']}", ""]
  text += ["## GRPO, on-policy", "", grpo_table(results["grpo"]),
           "![on-policy curves](grpo_on_policy.png)", "",
           "## GRPO, off-policy (k2 as loss, with and without corrections)", "",
           grpo_table(results["grpo_off_policy"]), "![off-policy curves](grpo_off_policy.png)", "",
           "## k2 as loss vs k1 in reward, identical seeds", "",
           "Per seed: the step at which the two runs first sampled a different batch, the "
           "largest relative gap of their gradient norms before it, and the relative distance "
           "of their final parameters.", "",
           "| seed | identical batches until step | max relative grad-norm gap before | final "
           "‖θ_a − θ_b‖/‖θ_a‖ |", "|---|---|---|---|"]
  for seed, g in enumerate(results["trajectory"]):
    text.append(f"| {seed} | {g['identical_batches_until_step']} of {g['steps']} | "
                f"{g['max_rel_grad_norm_gap_while_identical']:.1e} | "
                f"{g['final_rel_param_distance']:.1e} |")
  text += ["", "![trajectory gap](trajectory_k2_vs_k1_in_reward.png)", "",
           "## Bandit (exact and sampled gradients)", "",
           "TV distance of each final policy from the reverse-KL optimum π* ∝ π_ref·exp(r/β), the "
           "forward-KL optimum and the β=0 optimum.", "",
           _bandit_table(results["bandit"]), "![bandit](bandit_final_distances.png)", "",
           *_regime_section(results), *_sequence_section(results), *_stress_section(results),
           *_stage_section(results),
           "## Oracle: exact expected gradients", "",
           "‖g‖ is the norm of the exact expected gradient; distances are relative. *frozen* is "
           "the frozen-prefix ∇RKL (off-policy: prefixes weighted by π_old). A term *follows* a "
           "target within 1e-4.", "", oracle_md]
  paths.write_atomic(paths.resolve(path), "\n".join(text))


# ---------------------------------------------------------------- the whole job


def run(settings: Settings, workdir: str, *, progress: bool = True) -> dict:
  """Runs everything (resuming finished parts) and writes the report; returns results.json."""
  import platform

  from kljax import bandit, gradient_table

  from kljax.train import grpo

  for variants, off in ((ON_POLICY, False), (OFF_POLICY, True)):  # bad settings fail first
    for v in variants:
      grpo.validate(grpo_config(settings, v, 0, off_policy=off))
  paths.check_reachable(workdir, flag="--workdir")
  workdir = paths.resolve(workdir)
  if paths.is_local(workdir):
    workdir.mkdir(parents=True, exist_ok=True)
  start = time.time()
  rows = gradient_table.table(settings.oracle_terms)
  problem = bandit.make_problem(num_arms=10, beta=0.3, seed=0)
  bandit_runs = bandit.run_all(problem, BANDIT_TERMS, modes=settings.bandit_modes,
                               num_steps=settings.bandit_steps, learning_rate=0.1,
                               progress=progress)
  bandit_summary = {}
  for r in bandit_runs:
    d = bandit.final_distances(r, problem)
    bandit_summary[f"{r.term} @ {r.mode}"] = {**d, "nearest": nearest_optimum(d)}
  bandit.plot_final(bandit_runs, problem, workdir / "bandit_final_distances.png")
  exact_bandit = {k.split(" @ ")[0]: d for k, d in bandit_summary.items() if k.endswith("exact")}
  regimes = run_regimes(modes=settings.bandit_modes, num_steps=settings.regime_steps,
                        progress=progress)
  for term in REGIME_PAIRS:
    plot_regime(regimes, term, workdir / regime_file(term))

  fresh: list[str] = []  # GRPO runs trained (not read back) by this invocation
  runs = {"on_policy": run_variants(settings, workdir, ON_POLICY, progress=progress,
                                    trained=fresh),
          "off_policy": run_variants(settings, workdir, OFF_POLICY, off_policy=True,
                                     progress=progress, trained=fresh)}
  grpo_summary = summarize(runs["on_policy"], settings.final_window)
  off_summary = summarize(runs["off_policy"], settings.final_window)
  gaps = trajectory_gap(runs["on_policy"]["k2_as_loss"], runs["on_policy"]["k1_in_reward"])
  param_gaps = [final_param_distance(*(workdir / "grpo" / "on_policy" / v / f"seed{s}"
                                       for v in ("k2_as_loss", "k1_in_reward")))
                for s in range(settings.seeds)]
  for g, d in zip(gaps, param_gaps):
    g["final_rel_param_distance"] = d
  seq = run_sequence_study(settings, workdir, progress=progress)
  plot_sequence(seq, workdir / "sequence_study.png")
  plot_noise(seq, workdir / "gradient_noise.png")
  runs["stress"] = run_variants(settings, workdir, settings.stress_variants, stress=True,
                                progress=progress, trained=fresh)
  window = min(settings.final_window, settings.stress_steps)
  stress = {"summary": summarize(runs["stress"], window),
            "stability": stability(runs["stress"], window),
            "description": f"arithmetic level 1 from a {settings.stress_sft_steps}-step warm start, "
                           f"learning rate {settings.stress_learning_rate:g}, β = {settings.beta}, "
                           f"{settings.stress_steps} steps, {settings.stress_seeds} seeds"}
  plot_curves(runs["stress"], workdir / "grpo_stress.png",
              f"GRPO stress: {stress['description']}")
  extra = {"regimes": regimes, "sequence": seq, "stress": stress,
           "off_policy_means": run_means(runs["off_policy"], ("ppo_kl", "kl_grad_zeroed_fraction")),
           "warm_max_seq_log_ratio": max((row.get("max_seq_log_ratio", float("nan"))
                                          for h in runs["on_policy"]["k2_as_loss"] for row in h),
                                         default=float("nan"))}
  plot_curves(runs["on_policy"], workdir / "grpo_on_policy.png",
              f"GRPO on-policy, β = {settings.beta}, mean ± std over {settings.seeds} seeds")
  plot_curves(runs["off_policy"], workdir / "grpo_off_policy.png",
              f"GRPO off-policy ({settings.off_policy_epochs} epochs × "
              f"{settings.off_policy_minibatches} minibatches), β = {settings.beta}")
  plot_trajectory(gaps, workdir / "trajectory_k2_vs_k1_in_reward.png")

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
      "sequence": {k: v for k, v in seq.items() if k not in ("curves", "key")},
      "grpo_stress": {"summary": stress["summary"], "stability": stress["stability"],
                      "description": stress["description"]},
      "reward_stage": reward_stage_effect(grpo_summary),
      "reward_stage_audit": reward_stage_audit(),
      "verdicts": verdicts(rows, exact_bandit, grpo_summary, off_summary, gaps, param_gaps,
                           extra),
      "meta": {"settings": dataclasses.asdict(settings),
               "machine": f"{os.cpu_count()} CPU cores ({platform.machine()})"},
  }
  elapsed = time.time() - start
  results["meta"]["seconds"] = elapsed
  results["meta"]["grpo_runs_trained"] = len(fresh)
  results["meta"]["grpo_runs_read_back"] = sum(len(h) for r in runs.values()
                                               for h in r.values()) - len(fresh)
  paths.write_atomic(workdir / "results.json", json.dumps(results, indent=1, ensure_ascii=False))
  write_report(workdir / "report.md", settings, results, gradient_table.markdown(rows),
               elapsed)
  return results
