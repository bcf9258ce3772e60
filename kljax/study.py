"""Comparing GRPO variants over seeds: run them, summarize their end points, test differences.

`run_variants` trains one GRPO run per (variant, seed) from one shared warm start and reads
finished runs back instead of retraining them; `summarize` gives each variant's final values over
seeds; `welch` tests whether two variants differ; `trajectory_gap` measures how long two runs with
identical seeds sample identical batches. The reproduction (`experiments/reproduce/`) and the GRPO
notebook are built from these; tables, figures and verdicts live with them, not here.

A run's "final" value of a metric is its mean over the last `window` steps (one step's batch is
noisy); spreads over seeds are sample standard deviations (ddof = 1).
"""

from __future__ import annotations

import json
import math
import time
from typing import Any, Callable

import jax
import numpy as np

from kljax import paths
from kljax.progress import bar as tqdm  # log lines when not on a terminal
from kljax.train import grpo
from kljax.train.checkpoint import Checkpointer
from kljax.train.metrics import read_jsonl
from kljax.train.sft import initial_model

METRICS = ("reward", "exact_rkl", "exact_fkl", "entropy", "reward_std", "length_std")
_COLUMN = {"reward": "reward_mean"}  # summary name -> metrics.jsonl name
WALL_TIME_FILE = "wall_seconds.json"  # a finished piece of work's cost, kept beside it
RUN_CONFIG_FILE = "run_config.json"  # the config a run directory was trained with


def check_run_config(run_dir, config) -> None:
  """Raises ValueError when `run_dir` holds a run trained with another config than `config` (the
  one `record_run_config` stored), naming the settings that differ: a finished run is read back and
  an interrupted one resumed only under the config that made it. A directory without a record
  passes."""
  path = paths.resolve(run_dir) / RUN_CONFIG_FILE
  if not path.exists():
    return
  before, now = _flat(json.loads(path.read_text())), _flat(json.loads(config.to_json_best_effort()))
  diff = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
  if diff:
    shown = "; ".join(f"{k}: {before.get(k)!r} then, {now.get(k)!r} now" for k in diff[:5])
    raise ValueError(f"{run_dir} holds a run trained with another config ({shown}"
                     f"{'; …' if len(diff) > 5 else ''}): use another --workdir, or delete that "
                     f"directory to train it again.")


def record_run_config(run_dir, config) -> None:
  """Stores the config a run in `run_dir` is trained with (see `check_run_config`)."""
  paths.write_atomic(paths.resolve(run_dir) / RUN_CONFIG_FILE,
                     config.to_json_best_effort(sort_keys=True, indent=1))


def _flat(tree: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
  return out


def add_wall_seconds(path, seconds: float) -> None:
  """Adds `seconds` to the cost stored in `path` (a resumed run costs all its invocations)."""
  path = paths.resolve(path)
  paths.write_atomic(path, json.dumps({"seconds": wall_seconds(path, default=0.0) + seconds}))


def wall_seconds(path, *, default: float = math.nan) -> float:
  """The cost stored in `path` by `add_wall_seconds`; `default` when none was stored."""
  path = paths.resolve(path)
  return float(json.loads(path.read_text())["seconds"]) if path.exists() else default


def run_variants(config_fn: Callable[[str, int], Any], workdir, variants, *, seeds: int,
                 block: str = "runs", warm_start: str = "sft", progress: bool = True,
                 trained: list | None = None,
                 costs: dict[str, float] | None = None) -> dict[str, list[list[dict]]]:
  """GRPO for every (variant, seed), all from one supervised warm start; returns {variant:
  [metrics rows per seed]}.

  `config_fn(variant, seed)` gives each run's GRPO config (every one is validated before any
  work). The warm start is trained from `config_fn(variants[0], 0)` once, into WORKDIR/<warm_start>.
  A run lives in WORKDIR/grpo/<block>/<variant>/seed<k>: an interrupted one resumes from its last
  checkpoint, a finished one is read back, not rerun — both only under the config that made them
  (`check_run_config`: another config is an error naming what changed). Each piece of work stores its wall time
  beside it (`WALL_TIME_FILE`); `costs` (if given) receives {path: seconds} of every run and of the
  warm start, read back for finished ones, so a report can state what its runs cost. `trained`
  (if given) receives the directories of the runs trained by this call."""
  if seeds < 1:
    raise ValueError(f"seeds must be >= 1, got {seeds}.")
  variants = list(variants)
  jobs = [(v, s) for v in variants for s in range(seeds)]
  for variant, seed in jobs:  # every config, before any work (`train` checks each run's paths)
    grpo.validate(config_fn(variant, seed))
  workdir = paths.resolve(workdir)
  first = config_fn(variants[0], 0)
  sft_dir = workdir / warm_start
  sft_cost = workdir / f"{warm_start}_{WALL_TIME_FILE}"
  start = time.time()
  fresh_warm_start = not first.model.init and not (sft_dir / "config.json").exists()
  init_model = initial_model(first, sft_dir)
  if fresh_warm_start:
    add_wall_seconds(sft_cost, time.time() - start)
  if costs is not None and not first.model.init:
    costs[str(sft_dir)] = wall_seconds(sft_cost)
  steps = first.num_steps
  out: dict[str, list[list[dict]]] = {}
  bar = tqdm(jobs, desc=f"grpo {block.replace('_', '-')} runs", unit="run", disable=not progress)
  for variant, seed in bar:
    bar.set_postfix_str(f"{variant} seed {seed}")
    run_dir = workdir / "grpo" / block / variant / f"seed{seed}"
    path = run_dir / "metrics.jsonl"
    config = config_fn(variant, seed)
    check_run_config(run_dir, config)
    if not (path.exists() and len(read_jsonl(path)) >= steps):
      if trained is not None:
        trained.append(run_dir)
      record_run_config(run_dir, config)
      start = time.time()
      grpo.train(config, run_dir, init_model=init_model, progress=progress,
                 bar_options={"desc": f"  {variant} seed {seed}", "leave": False, "position": 1})
      add_wall_seconds(run_dir / WALL_TIME_FILE, time.time() - start)
    if costs is not None:
      costs[str(run_dir)] = wall_seconds(run_dir / WALL_TIME_FILE)
    out.setdefault(variant, []).append(read_jsonl(path)[:steps])
  return out


def final(history: list[dict], metric: str, window: int) -> float:
  """The mean of `metric` over the last `window` steps of one run."""
  return float(np.mean([row[_COLUMN.get(metric, metric)] for row in history[-window:]]))


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


def permutation_test(x, y) -> dict[str, float]:
  """Exact two-sided permutation test of equal means: {"p", "min_p", "n_x", "n_y"}.

  p = the fraction of the C(n_x + n_y, n_x) ways to split the pooled seeds into groups of n_x and
  n_y whose |mean difference| is at least the observed one (distribution-free: no normality
  assumption, unlike `welch`). min_p is the smallest p any data can give at these sizes,
  2/C(n, n_x) for equal groups (a split and its mirror tie) and 1/C(n, n_x) otherwise: 1/3 for
  2 vs 2 seeds, so 2 vs 2 can never reach p < 0.05, while 4 vs 4 can (2/70 ≈ 0.029). NaN when a
  group is empty.
  """
  import itertools

  x, y = np.asarray(x, np.float64).ravel(), np.asarray(y, np.float64).ravel()
  out = {"n_x": float(x.size), "n_y": float(y.size)}
  if x.size < 1 or y.size < 1:
    return out | {"p": float("nan"), "min_p": float("nan")}
  pooled = np.concatenate([x, y])
  n, k = pooled.size, x.size
  observed = abs(x.mean() - y.mean())
  total = pooled.sum()
  splits = np.asarray(list(itertools.combinations(range(n), k)))
  sums = pooled[splits].sum(axis=1)
  diffs = np.abs(sums / k - (total - sums) / (n - k))
  p = float(np.mean(diffs >= observed - 1e-12 * max(abs(observed), 1.0)))
  return out | {"p": p, "min_p": (2.0 if k == n - k else 1.0) / math.comb(n, k)}


def summarize(runs: dict[str, list[list[dict]]], window: int) -> dict[str, dict[str, Any]]:
  """{variant: {metric: mean over seeds of the final value, metric_seed_std: sample std over
  seeds (ddof = 1), metric_seeds: the per-seed finals, seeds}} for each of `METRICS`."""
  out = {}
  for variant, histories in runs.items():
    row: dict[str, Any] = {}
    for m in METRICS:
      finals = [final(h, m, window) for h in histories]
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


def final_param_distance(dir_a, dir_b) -> float:
  """‖θ_a − θ_b‖ / ‖θ_a‖ between the policies of two runs' latest checkpoints."""
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
