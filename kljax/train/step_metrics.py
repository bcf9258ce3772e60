"""What a GRPO step logs: rewards, lengths, the rollout policy's per-token statistics, its KL to
the reference (estimated and exact), the updates' diagnostics, the sampler's gap to the trainer,
and timings (`step_metrics`, `sampler_metrics`).

Without a reference model (kl.term = "none" and metrics.exact_kl off) the metrics that compare the
policy to the reference (`REFERENCE_METRICS`) are NaN: absent, never a false zero.
"""

from __future__ import annotations

import hashlib

import numpy as np

from kljax import advantages as adv_lib
from kljax import estimators as est
from kljax import offpolicy, rewards
from kljax.train.devices import to_host
from kljax.train.objective import KLObjective


def tokens_hash(tokens: np.ndarray) -> float:
  """A 48-bit hash of a token array (its bytes, dtype and shape) as a float (exact in float64), so
  that two runs can be checked to have sampled identical batches from their metrics alone."""
  x = np.ascontiguousarray(tokens)
  h = hashlib.sha256(f"{x.dtype}{x.shape}".encode() + x.tobytes()).digest()
  return float(int.from_bytes(h[:6], "big"))


# Metrics that compare the policy to the reference: NaN ("absent") when no reference runs
# (kl.term = "none" without metrics.exact_kl), never a false zero.
REFERENCE_METRICS = ("exact_rkl", "exact_fkl", "k1", "k2", "k3", "clamped_tokens",
                     "max_log_ratio", "max_seq_log_ratio")


def _reference_metrics(stats: dict, mask: np.ndarray, tmean, kl: KLObjective) -> dict:
  """The REFERENCE_METRICS of the rollout policy's per-token statistics (and, for a term that
  clamps its value, e.g. `k3_as_loss+value_clamp`, the tokens its clamp touches)."""
  nan = float("nan")
  out = {"exact_rkl": tmean(stats["rkl"]) if "rkl" in stats else nan,
         "exact_fkl": tmean(stats["fkl"]) if "fkl" in stats else nan}
  if "ref_logp" not in stats:
    return out | {k: nan for k in REFERENCE_METRICS if k not in out}
  lp, ref_lp = stats["logp"], stats["ref_logp"]
  m = np.asarray(mask, np.float32)
  out |= kl.clamp_metrics(lp, ref_lp, mask)
  return out | {
      "k1": tmean(est.k1(lp, ref_lp)), "k2": tmean(est.k2(lp, ref_lp)),
      "k3": tmean(est.k3(lp, ref_lp)),
      "clamped_tokens": float(est.count_clamped(lp, ref_lp, mask=mask)),
      # the regime indicators: how far above π_ref the sampled tokens / completions sit (nats)
      "max_log_ratio": float(np.max(np.where(m > 0, lp - ref_lp, 0.0))),
      "max_seq_log_ratio": float(np.max(((lp - ref_lp) * m).sum(1))),
  }


def step_metrics(ro, scores: rewards.Scores, group: adv_lib.GroupAdvantages, stats: dict,
                 auxes: list[dict], beta, times: tuple[float, ...], kl: KLObjective) -> dict:
  """The step's metrics: rewards, lengths, per-token statistics of the rollout policy, the KL to
  the reference, the updates' mean aux, and timings. `times`: (start, rollout done, advantages
  done, updates done) from `time.perf_counter`."""
  m = np.asarray(ro.completion_mask, np.float32)
  ntok = max(m.sum(), 1.0)
  tmean = lambda x: float((to_host(x) * m).sum() / ntok)
  lengths = m.sum(1)
  t0, t_rollout, t_logprobs, t_update = times
  ref = _reference_metrics(stats, ro.completion_mask, tmean, kl)
  metrics = {
      "reward_mean": float(scores.total.mean()), "reward_std": float(scores.total.std()),
      # accuracy: completions the first reward function scores above 0
      "accuracy": float(np.mean(list(scores.per_fn.values())[0] > 0)),
      "length_mean": float(lengths.mean()), "length_std": float(lengths.std()),
      "zero_variance_groups": float(group.zero_variance_fraction),
      "entropy": tmean(stats["entropy"]),
      **{k: ref[k] for k in REFERENCE_METRICS[:6]},
      "sampler_logprob_gap": tmean(np.abs(to_host(ro.sampler_logp) - stats["logp"])),
      "beta": float(beta), "reward_failures": float(scores.failures),
      "tokens_hash": tokens_hash(ro.tokens),
      **{k: ref[k] for k in REFERENCE_METRICS[6:]},
      # time_logprobs: rewards, advantages and (off-policy) the statistics pass; on-policy the
      # log-prob passes run inside the update
      "time_rollout": t_rollout - t0, "time_logprobs": t_logprobs - t_rollout,
      "time_update": t_update - t_logprobs,
      "tokens_per_second": float(m.sum()) / max(t_update - t0, 1e-9),
  }
  for k in auxes[0]:
    metrics[k] = float(np.mean([float(a[k]) for a in auxes]))
  metrics["param_norm"] = float(auxes[-1]["param_norm"])  # after the step's last update
  return metrics


def sampler_metrics(correction, ro, old_logp: np.ndarray) -> dict:
  """Sampler → trainer: the ESS of the ratios π_old/μ (token and sequence level), the fraction
  the correction truncated or masked, the mean weight (`kljax.offpolicy.diagnostics`); the mean
  |log μ − log π_old| is `sampler_logprob_gap`."""
  mu, mask = to_host(ro.sampler_logp), ro.completion_mask
  weights = (correction or offpolicy.no_correction)(old_logp, mu, mask)
  return {k: float(v) for k, v in offpolicy.diagnostics(old_logp, mu, mask, weights).items()}

