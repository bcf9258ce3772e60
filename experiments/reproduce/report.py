"""The report: markdown tables and sections of report.md, built from results.json's content."""

from __future__ import annotations

import math

import numpy as np

from experiments.reproduce.settings import ALPHA, REGIME_PAIRS, REGIME_TERMS
from experiments.reproduce.verdicts import OPTIMA, mean_std, regime_boundary
from kljax import paths
from kljax.study import METRICS, seed_std


def regime_file(term: str) -> str:
  return "regime_" + "".join(ch if ch.isalnum() else "_" for ch in term).strip("_") + ".png"


def grpo_table(summary: dict) -> str:
  """A markdown table of `summarize` output: final metrics, mean ± std over seeds."""
  lines = ["| variant | reward | exact KL(π‖π_ref) | exact KL(π_ref‖π) | entropy | reward std "
           "| length std | seeds |", "|---|---|---|---|---|---|---|---|"]
  for v, row in summary.items():
    lines.append(f"| `{v}` | " + " | ".join(mean_std(row, m) for m in METRICS) + f" | {row['seeds']} |")
  return "\n".join(lines) + "\n"


def bandit_table(bandit_summary: dict) -> str:
  lines = ["| KL term | gradients | TV to π* | TV to forward-KL opt. | TV to β=0 opt. | nearest |",
           "|---|---|---|---|---|---|"]
  for key, d in bandit_summary.items():
    term, mode = key.split(" @ ")
    lines.append(f"| `{term}` | {mode} | {d['tv_star']:.2e} | {d['tv_fkl']:.2e} | "
                 f"{d['tv_zero']:.2e} | {OPTIMA[d['nearest']]} |")
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
  t = st.get("target")
  rare = (f"the reward's best completion {t['text']!r} has log π_ref {t['mean_log_ref']:.1f} nats "
          f"on average (at most {t['max_log_ref']:.1f}) over {t['prompts']} test prompts under the "
          f"runs' reference, so the policy must move mass to a completion the reference almost "
          f"never produces" if t else "correct answers are rare at the start")
  lines = ["## Claim 3 in a stressing GRPO regime", "", f"{st['description']}: {rare}.", "",
           grpo_table(st["summary"]),
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


def reward_at_lines(results: dict) -> list[str]:
  """`k1_in_reward` off-policy, penalty at rollout vs at the current parameters (kl.reward_at)."""
  e = results.get("reward_at")
  if not e:
    return []
  lines = ["`k1_in_reward` off-policy, the in-reward penalty computed at rollout and held over the "
           "epochs (`kl.reward_at=\"rollout\"`, the default) vs recomputed at the current "
           "parameters in every minibatch (`\"current\"`). Final values, mean ± sample std over "
           "seeds, Welch p and exact permutation p:", "",
           "| metric | rollout | current | current − rollout | Welch p | permutation p |",
           "|---|---|---|---|---|---|"]
  for m, x in e.items():
    lines.append(f"| {m} | {x['rollout']:.4f} ± {x['rollout_seed_std']:.4f} | "
                 f"{x['current']:.4f} ± {x['current_seed_std']:.4f} | {x['difference']:+.4f} | "
                 f"{x['p']:.2g} | {x['permutation_p']:.2g} |")
  x = next(iter(e.values()))
  lines += ["", (f"With these seeds the permutation test cannot go below p = "
                 f"{x['permutation_min_p']:.2g}. " if x["permutation_min_p"] >= 0.05 else "")
            + ("What each follows (`kljax.audit`, exact enumeration): " + "; ".join(
                f"{k}: {v}" for k, v in results.get("reward_at_audit", {}).items()) + ". "
               "Reward-to-go credit stays biased off-policy in both modes (its later tokens keep "
               "π_old's law).").strip(), ""]
  return lines


def _studies_section(results: dict) -> list[str]:
  """Beyond the paper: the two studies' own sections (experiments/studies), with their figures."""
  studies = results.get("studies") or {}
  if not studies:
    return []
  from experiments.studies import sequence_variance, staleness

  stale = staleness.markdown(studies["staleness"])
  return ["## Beyond the paper", "",
          sequence_variance.markdown(studies["sequence_variance"]), "",
          "![sequence ∇RKL variance](sequence_variance.png)", "",
          "#" + stale if stale.startswith("## ") else stale, "",
          "![stale rollouts](staleness.png)", ""]


def cost_sentence(meta: dict) -> str:
  """What the results cost: the stored wall time of every cached piece of work plus the parts the
  last invocation recomputed (so re-running on a finished directory keeps the total)."""
  minutes = meta["seconds"] / 60
  text = f"Total time {minutes:.1f} min on {meta['machine']}"
  if meta.get("grpo_runs_read_back"):
    text += (f" (the sum of each part's wall time: {meta['grpo_runs_read_back']} GRPO runs and "
             f"any cached study were read back from an earlier invocation of the same command, "
             f"which stored their cost; this invocation took "
             f"{meta['seconds_recomputed'] / 60:.1f} min)")
  if meta.get("costs_unknown"):
    text += f"; the cost of {meta['costs_unknown']} cached part(s) was not recorded and is left out"
  return text + "."


def settings_label(settings, modified: dict) -> str:
  if not modified:
    return settings.label
  return f"{settings.label}, modified: " + ", ".join(f"{k}={v}" for k, v in modified.items())


def write_report(path, settings, results: dict, oracle_md: str) -> None:
  v = results["verdicts"]
  claims = {
      "1_k1_as_loss_no_regularization": "k1 as loss gives no regularization",
      "2_k2_as_loss_equals_k1_in_reward": "k2 as loss is gradient-equivalent to k1 in reward "
                                          "on-policy (Thm 5.1)",
      "3_k3_as_loss_weaker_than_k2": "k3 as loss is a biased approximation that regularizes more "
                                     "weakly than k2 (the paper adds \"and less stably\": see "
                                     "the stability sentence)",
      "4_off_policy_correction": "off-policy, KL-as-loss is biased without importance sampling; "
                                 "the corrections remove the bias",
  }
  meta = results["meta"]
  text = [
      "# Reproducing Liu et al., *Rethinking KL Regularization in RLHF* (arXiv:2510.01555)", "",
      f"Settings `{settings_label(settings, meta.get('modified', {}))}` "
      f"(`configs/reproduce.py`): GRPO on single-digit arithmetic with the "
      f"`tiny` preset from a {settings.sft_steps}-step supervised warm start, β = {settings.beta}, "
      f"{settings.steps} steps × 64 completions, {settings.seeds} seed(s) per variant (the same "
      f"seeds for every variant); off-policy runs take {settings.off_policy_epochs} epochs × "
      f"{settings.off_policy_minibatches} minibatches per rollout. Final values are means over the "
      f"last {settings.final_window} steps, shown as mean ± sample std (ddof = 1) over seeds; "
      f"\"differs\" means a two-sided Welch t-test over the seeds gives p < {ALPHA} (with "
      f"{settings.seeds} seeds a test of little power: a large p is no evidence of equality). "
      + cost_sentence(meta), "",
      "## Verdicts", "",
  ]
  for key, claim in claims.items():
    text += [f"**{key[0]}. {claim}: {v[key]['verdict']}.** {v[key]['evidence']}", ""]
  text += ["## GRPO, on-policy", "", grpo_table(results["grpo"]),
           "![on-policy curves](grpo_on_policy.png)", "",
           "## GRPO, off-policy (k2 as loss with and without corrections"
           + ("; k1 in reward by penalty mode)" if results.get("reward_at") else ")"), "",
           grpo_table(results["grpo_off_policy"]), "![off-policy curves](grpo_off_policy.png)", "",
           *reward_at_lines(results),
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
           bandit_table(results["bandit"]), "![bandit](bandit_final_distances.png)", "",
           *_regime_section(results), *_sequence_section(results), *_stress_section(results),
           *_stage_section(results), *_studies_section(results),
           "## Oracle: exact expected gradients", "",
           "‖g‖ is the norm of the exact expected gradient; distances are relative. *frozen* is "
           "the frozen-prefix ∇RKL (off-policy: prefixes weighted by π_old). A term *follows* a "
           "target within 1e-4. Off-policy, the in-reward terms here take their penalty at the "
           "current parameters (each term's own surrogate, `kl.reward_at=\"current\"`); computed "
           "at rollout and held over the epochs (the trainer's default) k1 in reward is biased "
           "off-policy: ∇RKL − ∇KL(π‖π_old) (`kljax.audit`, docs/kl_terms.md).", "", oracle_md]
  paths.write_atomic(paths.resolve(path), "\n".join(text))


