"""Every figure the experiments draw: GRPO curves, the bandit, the reproduction's studies.

One moving average, one palette (no two series of a figure share a colour), and the same rules for
every figure: axes say what they measure and in which unit, the smoothing window is stated, a floor
drawn for a log axis is marked as one, panels whose series are all constant are left out, and the
title says what to look for. Figures are written whole through `kljax.paths` (local or gs://…).
"""

from __future__ import annotations

import textwrap

import numpy as np

from kljax import paths

STYLES = ("-", "--", ":", "-.")


def colour(i: int):
  """The i-th of 60 distinct colours: tab20's dark shades, its light ones, then tab20b and tab20c."""
  import matplotlib

  tab20 = matplotlib.colormaps["tab20"].colors
  palette = (tab20[0::2] + tab20[1::2] + matplotlib.colormaps["tab20b"].colors
             + matplotlib.colormaps["tab20c"].colors)
  if i >= len(palette):
    raise ValueError(f"a figure has at most {len(palette)} series (distinct colours), got {i + 1}.")
  return palette[i]


def moving_average(values, window: int) -> np.ndarray:
  """Trailing mean over `window` steps (the 'valid' part: len − window + 1 values); the values
  themselves when `window` ≤ 1 or the series is shorter than the window."""
  v = np.asarray(values, np.float64)
  if window <= 1 or v.shape[-1] < window:
    return v
  kernel = np.ones(window) / window
  if v.ndim == 1:
    return np.convolve(v, kernel, mode="valid")
  return np.stack([np.convolve(r, kernel, mode="valid") for r in v])


def smoothing_note(window: int) -> str:
  return f"moving average over {window} steps" if window > 1 else "no smoothing"


def _pyplot():
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


def _save(fig, path, dpi: int = 100) -> None:
  plt = _pyplot()
  paths.save_figure(fig, path, dpi=dpi)
  plt.close(fig)


def _legend(ax, **kwargs) -> None:
  """A legend only where labelled artists exist (no empty-legend warning)."""
  if ax.get_legend_handles_labels()[0]:
    ax.legend(**kwargs)


def _mark_floor(ax, floor: float, what: str = "values at or below it") -> None:
  ax.axhline(floor, color="k", lw=0.7, ls=(0, (1, 3)), label=f"floor {floor:g}: {what}")


def informative(series: list[np.ndarray]) -> bool:
  """Whether a panel's series carry information: some value differs from the others."""
  values = np.concatenate([np.ravel(s) for s in series]) if series else np.zeros(0)
  values = values[np.isfinite(values)]
  return values.size > 0 and bool(np.ptp(values) > 0)


def identical_series(curves: dict[str, np.ndarray]) -> list[tuple[str, str]]:
  """Pairs (a, b) of names whose arrays are equal: b is drawn exactly on top of a."""
  names = list(curves)
  out = []
  for i, b in enumerate(names):
    for a in names[:i]:
      if curves[a].shape == curves[b].shape and np.array_equal(curves[a], curves[b]):
        out.append((a, b))
        break
  return out


# ---------------------------------------------------------------- GRPO curves

GRPO_PANELS = {
    "reward_mean": "reward (mean over completions)",
    "accuracy": "accuracy (fraction correct)",
    "reward_std": "reward std within a step",
    "exact_rkl": "exact KL(π‖π_ref) (nats/token)",
    "exact_fkl": "exact KL(π_ref‖π) (nats/token)",
    "k3": "k3 estimate of KL(π‖π_ref) (nats/token)",
    "entropy": "entropy (nats/token)",
    "length_mean": "completion length (tokens)",
    "clip_fraction": "PPO clip fraction (tokens)",
    "loss": "loss",
    "grad_norm": "gradient norm ‖g‖₂",
    "update_norm": "update norm ‖Δθ‖₂",
}


def grpo_curves(runs: dict[str, list[list[dict]]], path, title: str, *, smooth: int = 15,
                metrics=("reward_mean", "exact_rkl", "entropy", "length_mean")) -> list[str]:
  """Mean over seeds with a ±1 sample-std band, one panel a metric, one line a run label
  (e.g. a KL term). Returns the metrics drawn: panels whose values are constant over every run and
  step are left out, as is `accuracy` where it equals `reward_mean` at every step. The title gets
  the smoothing window and which runs lie exactly on top of each other."""
  plt = _pyplot()
  rows = {name: [h for h in hs if h] for name, hs in runs.items()}
  drawn = []
  for m in metrics:
    series = [np.asarray([r[m] for r in h], np.float64) for hs in rows.values() for h in hs
              if h and all(m in r for r in h)]
    if m == "accuracy" and all(all(r.get("accuracy") == r.get("reward_mean") for r in h)
                               for hs in rows.values() for h in hs):
      continue
    if informative(series):
      drawn.append(m)
  if not drawn:
    raise ValueError(f"grpo_curves: no metric of {list(metrics)} varies in these runs.")
  seeds = max(len(hs) for hs in rows.values())
  fig, axes = plt.subplots(1, len(drawn), figsize=(4.8 * len(drawn), 3.9), squeeze=False)
  means = {}
  for ax, m in zip(axes[0], drawn):
    for i, (name, hs) in enumerate(rows.items()):
      hs = [h for h in hs if all(m in r for r in h)]
      if not hs:
        continue
      n = min(len(h) for h in hs)
      y = moving_average(np.array([[r[m] for r in h[:n]] for h in hs]), smooth)  # [seeds, steps]
      x = np.arange(y.shape[1]) + (n - y.shape[1]) + 1
      mean = y.mean(0)
      sd = y.std(0, ddof=1) if y.shape[0] > 1 else np.zeros_like(mean)
      means.setdefault(name, []).append(mean)
      ax.plot(x, mean, label=name, color=colour(i), lw=1.5, ls=STYLES[i % len(STYLES)])
      if y.shape[0] > 1:
        ax.fill_between(x, mean - sd, mean + sd, color=colour(i), alpha=0.12)
    ax.set_ylabel(GRPO_PANELS.get(m, m))
    ax.set_xlabel("GRPO step")
    ax.grid(alpha=0.3)
  _legend(axes[0, 0], fontsize=8)
  same: dict[str, list[str]] = {}
  for a, b in identical_series({k: np.concatenate(v) for k, v in means.items()}):
    same.setdefault(a, []).append(b)
  shortest = min(len(h) for hs in rows.values() for h in hs)
  notes = [smoothing_note(smooth if shortest >= smooth else 1)
           + (f"; band: ±1 sample std over {seeds} seeds" if seeds > 1 else "")]
  notes += [f"{' and '.join(bs)} {'lies' if len(bs) == 1 else 'lie'} exactly under {a} "
            f"(identical curves)" for a, bs in same.items()]
  text = textwrap.fill("; ".join(notes), width=int(30 * len(drawn)))
  fig.suptitle(title + "\n" + text, fontsize=10)
  fig.tight_layout()
  _save(fig, path)
  return drawn


def trajectory_gaps(gaps: list[dict], path, *, names=("k2_as_loss", "k1_in_reward")) -> None:
  """Per seed, the relative gaps of two runs' gradient norms and exact KLs step by step."""
  plt = _pyplot()
  floor = 1e-9
  fig, axes = plt.subplots(1, 2, figsize=(11.5, 3.9))
  panels = (("rel_grad_norm_gap", "relative gap of the gradient norms"),
            ("rel_exact_rkl_gap", "relative gap of exact KL(π‖π_ref)"))
  parted = False
  for seed, g in enumerate(gaps):
    for ax, (key, _) in zip(axes, panels):
      ax.semilogy(np.arange(1, len(g[key]) + 1), np.maximum(g[key], floor),
                  label=f"seed {seed}", lw=0.9, color=colour(seed))
      if g["identical_batches_until_step"] < g["steps"]:
        parted = True
        ax.axvline(g["identical_batches_until_step"] + 1, color=colour(seed), ls=":", lw=1)
  for ax, (_, label) in zip(axes, panels):
    _mark_floor(ax, floor, "exact 0 drawn here")
    ax.set_ylabel(f"{label} (|a − b| / |a|)")
    ax.set_xlabel("GRPO step")
    ax.grid(alpha=0.3)
    _legend(ax, fontsize=8)
  fig.suptitle(f"{names[0]} vs {names[1]}, identical seeds: how far apart their updates are while "
               f"the sampled tokens are equal\n" + ("dotted: first step with a differing batch"
                                                    if parted else
                                                    "every step sampled identical batches"),
               fontsize=10)
  fig.tight_layout()
  _save(fig, path)


# ---------------------------------------------------------------- bandit


def bandit_final(results, distances, path) -> None:
  """Grouped bars: each term's final TV distance from the three optima, one panel per gradient
  mode. `distances(run)` gives {"tv_star", "tv_fkl", "tv_zero"}."""
  plt = _pyplot()
  floor = 1e-7
  modes = list(dict.fromkeys(r.mode for r in results))
  fig, axes = plt.subplots(1, len(modes), figsize=(7.5 * len(modes), 5.2), squeeze=False)
  labels = {"tv_star": "π* (reverse-KL optimum)", "tv_fkl": "forward-KL optimum",
            "tv_zero": "β=0 optimum (no KL)"}
  for ax, mode in zip(axes[0], modes):
    runs = [r for r in results if r.mode == mode]
    x = np.arange(len(runs))
    for i, (key, label) in enumerate(labels.items()):
      vals = [max(distances(r)[key], floor) for r in runs]
      ax.bar(x + (i - 1) * 0.27, vals, width=0.27, label=label, color=colour(i))
    _mark_floor(ax, floor, "distances below it")
    ax.set_yscale("log")
    ax.set_xticks(x, [r.term for r in runs], rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("TV distance of the final policy (0–1)")
    ax.set_title(f"{mode} gradients")
    ax.grid(axis="y", alpha=0.3)
  handles, names = axes[0, 0].get_legend_handles_labels()
  fig.legend(handles, names, loc="upper center", ncol=4, fontsize=9)
  fig.suptitle("Bandit: which optimum each KL term converges to — the shortest bar names it",
               y=0.91, fontsize=10)
  fig.tight_layout(rect=(0, 0, 1, 0.88))
  _save(fig, path, dpi=110)


def bandit_curves(results, path) -> None:
  """TV distance to π* and to the forward-KL optimum over steps, one panel per (mode, target)."""
  plt = _pyplot()
  floor = 1e-7
  modes = list(dict.fromkeys(r.mode for r in results))
  terms = list(dict.fromkeys(r.term for r in results))
  fig, axes = plt.subplots(len(modes), 2, figsize=(13, 4.2 * len(modes)), squeeze=False)
  for row, mode in enumerate(modes):
    for col, (metric, label) in enumerate(
        [("tv_star", "TV to π* (reverse-KL optimum)"), ("tv_fkl", "TV to forward-KL optimum")]):
      ax = axes[row, col]
      for r in (x for x in results if x.mode == mode):
        i = terms.index(r.term)
        ax.plot(np.maximum(r.curves[metric], floor), label=r.term, lw=1.4,
                ls=STYLES[i % len(STYLES)], color=colour(i))
      _mark_floor(ax, floor, "distances below it")
      ax.set_yscale("log")
      ax.set_xlabel("optimizer step (Adam)")
      ax.set_ylabel(f"{label} (0–1)")
      ax.set_title(f"{mode} gradients", fontsize=10)
      ax.grid(alpha=0.3)
  handles, labels = axes[0, 0].get_legend_handles_labels()
  fig.legend(handles, labels, loc="center right", fontsize=8)
  fig.suptitle("Bandit: distance of each term's policy from the two optima; a term converges to "
               "the optimum whose distance falls to the floor (no smoothing; terms with equal "
               "gradients overlap)", fontsize=10)
  fig.tight_layout(rect=(0, 0, 0.8, 0.96))
  _save(fig, path, dpi=110)


def regime_map(regimes: list[dict], term: str, path, *, versus: str = "k2_as_loss") -> None:
  """Heat maps (one panel per gradient mode) of log10(final RKL of `term` / that of `versus`)."""
  plt = _pyplot()
  modes = [m for m in ("exact", "sampled") if any(r["gradients"] == m for r in regimes)]
  ps = sorted({r["pi_ref_best"] for r in regimes}, reverse=True)
  bs = sorted({r["beta"] for r in regimes})
  fig, axes = plt.subplots(1, len(modes), figsize=(5.8 * len(modes), 4.8), squeeze=False)
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
    ax.set_ylabel("π_ref(rewarded arm) (probability)")
    ax.set_title(f"{mode} gradients", fontsize=10)
    fig.colorbar(im, ax=ax, label="log10 of the final KL(π‖π_ref) ratio")
  fig.suptitle(f"{term} / {versus}: ratio of final KL(π‖π_ref) (numbers in the cells)\n"
               f"red: {term} lets π drift further from π_ref; blue: it stays closer; "
               f"–: neither moved (KL < 1e-5 nats)", fontsize=10)
  fig.tight_layout()
  _save(fig, path)


# ---------------------------------------------------------------- exact sequences


def sequence_study(seq: dict, path) -> None:
  """Exact sequence KL, π(y*), gradient norm and max |log δ| along training, mean ± std over
  seeds, one line per KL term."""
  plt = _pyplot()
  panels = (("rkl", "exact sequence KL(π‖π_ref) (nats)"), ("target_prob", "π(y*) (probability)"),
            ("grad_norm", "gradient norm ‖g‖₂ before clipping"),
            ("max_abs_log_delta", "max |log δ| on sampled tokens (nats)"))
  fig, axes = plt.subplots(1, len(panels), figsize=(19, 4.1))
  seeds = len(next(iter(seq["terms"].values()))["final_rkl_seeds"])
  for ax, (m, label) in zip(axes, panels):
    for i, (name, c) in enumerate(seq["curves"].items()):
      y = np.asarray(c[m])
      mean, sd = y.mean(0), y.std(0, ddof=1) if y.shape[0] > 1 else 0 * y[0]
      x = np.arange(1, y.shape[1] + 1)
      ax.plot(x, mean, color=colour(i), label=name, lw=1.3, ls=STYLES[i % len(STYLES)])
      ax.fill_between(x, mean - sd, mean + sd, color=colour(i), alpha=0.15)
    if m == "target_prob":
      ax.axhline(seq["optimum_target_prob"], color="k", lw=0.8, ls=":",
                 label="π*(y*), the reverse-KL optimum")
    ax.set_ylabel(label, fontsize=9)
    ax.set_xlabel("optimizer step (Adam)")
    ax.grid(alpha=0.3)
  _legend(axes[1], fontsize=8)
  fig.suptitle(f"Exact sequences: V = {seq['vocab']}, T = {seq['length']}, reward 1 on y* with "
               f"π_ref(y*) = {seq['ref_prob_target']:.1e}, β = {seq['beta']:g}; mean ± sample std "
               f"over {seeds} seeds, no smoothing. A term that regularizes as the reverse KL "
               f"should end near π*(y*) (dotted)", fontsize=10)
  fig.tight_layout()
  _save(fig, path)


def gradient_noise(seq: dict, path) -> None:
  """std/‖E g‖ of the sampled KL gradient of k2 and k3 as loss at the policies of both
  trajectories."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(7, 4.1))
  half = len(seq["noise_steps"]) // 2
  for i, name in enumerate(("k2_as_loss", "k3_as_loss")):
    y = np.asarray(seq["noise"][name])
    for j, (src, marker) in enumerate((("k2_as_loss", "o"), ("k3_as_loss", "s"))):
      ax.semilogy(seq["noise_steps"][j * half:(j + 1) * half], y[j * half:(j + 1) * half],
                  color=colour(2 * i + j), ls=STYLES[j], marker=marker, ms=3,
                  label=f"{name} gradient, at {src}'s policies")
  ax.set_xlabel("optimizer step of the trajectory")
  ax.set_ylabel("std / ‖E g‖ of the sampled KL gradient (ratio)")
  ax.set_title(f"Noise of the KL gradient, {seq['noise_samples']} sequences a batch: "
               f"lower is steadier\n(no smoothing; both estimators at the same policies)",
               fontsize=10)
  ax.grid(alpha=0.3, which="both")
  _legend(ax, fontsize=7)
  fig.tight_layout()
  _save(fig, path)


# ---------------------------------------------------------------- the audit


def coefficient(report: dict, path) -> None:
  """c(log δ) of an audit report (`kljax.audit`'s JSON form) against the known coefficients."""
  plt = _pyplot()
  c = report["coefficient"]
  ld = np.asarray(c["grid"])
  fig, ax = plt.subplots(figsize=(6.5, 4.2))
  ax.plot(ld, c["values"], color="black", lw=6, alpha=0.3, label=f"{report['name']} (measured)")
  ax.plot(ld, -ld, "--", color=colour(0), label="log π − log π_ref (follows ∇RKL)")
  ax.plot(ld, 1 - np.exp(ld), "--", color=colour(1), label="1 − δ (follows ∇FKL)")
  ax.axhline(0, color=colour(7), ls=":", label="0 (no gradient)")
  ax.set_ylim(-12, 12)
  ax.set_xlabel("log δ = log π_ref(y) − log π(y) (nats)")
  ax.set_ylabel("on-policy coefficient c (gradient = E[c·∇log π])")
  ax.set_title(f"{report['name']}: c(log δ) {c['identified']}\n(the wide grey measured curve lies "
               f"on the dashed one whose divergence it follows)", fontsize=9)
  _legend(ax, fontsize=8)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  _save(fig, path, dpi=120)
