"""The numbers of the README and docs/ from the committed results: every marked block is generated.

  python -m experiments.readme            # rewrite every block in its file (TARGETS)
  python -m experiments.readme --check    # exit 1 (naming file and block) when a file differs

A block is the text between `<!-- BEGIN name -->` and `<!-- END name -->` (each on its own line).
TARGETS names the file that holds each block: README.md or a page of docs/. The reproduce:* blocks
are written from experiments/results/quick/results.json (and full/ for the note on the full
report), speed:peers and engines:vllm from benchmarks/results/, plan:table from
experiments/results/plan/table.md (which `python -m experiments.plan --table` writes). Links in a
block are written relative to the file that holds it. tests/test_readme.py fails when a file
differs from them, so a number quoted from a run cannot go stale.
"""

from __future__ import annotations

import json
import math
import os
import posixpath
import re
import statistics
import sys

import numpy as np

from experiments.reproduce import report
from experiments.reproduce.settings import ALPHA, OFF_POLICY, VERL_K3
from experiments.reproduce.verdicts import OPTIMA, STRESS_SEARCH, regime_boundary
from kljax.study import permutation_test, seed_std, welch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = "experiments/results/quick"
FULL = "experiments/results/full"
PLAN_TABLE = "experiments/results/plan/table.md"

# The file (relative to the repository root) that holds each generated block.
TARGETS = {
    "reproduce:cost": "README.md",
    "reproduce:studies": "docs/kl.md",
    "reproduce:grpo": "docs/reproduction.md",
    "reproduce:claims": "docs/reproduction.md",
    "reproduce:bandit": "docs/reproduction.md",
    "reproduce:reward_stage": "docs/reproduction.md",
    "reproduce:full": "docs/reproduction.md",
    "engines:vllm": "docs/engines.md",
    "plan:table": "docs/scale.md",
    "speed:peers": "docs/speed.md",
    "suite:cost": "README.md",
    "checkpoint:cost": "docs/operations.md",
}
SUITE_COST = "experiments/results/suite_cost.json"


# ---------------------------------------------------------------- blocks


def _begin(name: str) -> str:
  return f"<!-- BEGIN {name} -->\n"


def _end(name: str) -> str:
  return f"<!-- END {name} -->\n"


def block(text: str, name: str) -> str:
  """The content of block `name` in `text`; ValueError when its markers are missing."""
  if text.count(_begin(name)) != 1 or text.count(_end(name)) != 1:
    raise ValueError(f"{TARGETS.get(name, 'the file')} needs exactly one '<!-- BEGIN {name} -->' "
                     f"and one '<!-- END {name} -->' line.")
  return text.split(_begin(name), 1)[1].split(_end(name), 1)[0]


def replace_block(text: str, name: str, content: str) -> str:
  """`text` with block `name` holding `content` (which ends with a newline)."""
  old = block(text, name)
  return text.replace(_begin(name) + old + _end(name), _begin(name) + content + _end(name))


def stale_blocks(text: str, contents: dict[str, str]) -> list[str]:
  """The names of the blocks whose content in `text` differs from `contents`."""
  return [name for name, content in contents.items() if block(text, name) != content]


_LINK = re.compile(r"\]\(([^)\s]+)\)")


def relink(content: str, target: str) -> str:
  """`content`, whose Markdown links are relative to the repository root, with each relative link
  rewritten relative to the directory of `target` (a path from the root, e.g. docs/kl.md)."""
  base = posixpath.dirname(target)
  if not base:
    return content

  def sub(m: re.Match) -> str:
    link = m.group(1)
    if re.match(r"[A-Za-z][A-Za-z0-9+.-]*:", link) or link.startswith("#"):
      return m.group(0)
    path, sep, anchor = link.partition("#")
    return f"]({posixpath.relpath(path, base)}{sep}{anchor})"

  return _LINK.sub(sub, content)


# ---------------------------------------------------------------- content


def _load(directory: str) -> dict:
  with open(os.path.join(ROOT, directory, "results.json")) as f:
    return json.load(f)


def mean_std(values) -> str:
  return f"{np.mean(values):.3f} ± {seed_std(values):.3f}"


def _msr(row: dict, metric: str) -> str:
  return f"{row[metric]:.4f} ± {row[f'{metric}_seed_std']:.4f}"


def _p(x: dict, y: dict, metric: str) -> str:
  p = welch(x[f"{metric}_seeds"], y[f"{metric}_seeds"])["p"]
  return "untestable" if math.isnan(p) else f"p = {p:.2g}"


def _stress_test(quick_k3: dict, quick_k2: dict) -> str:
  """The test behind the stress run's difference: the full run's (4 vs 4 seeds) when committed,
  with the exact permutation p beside Welch's; the quick run's 2 vs 2 cannot reach p < 0.05."""
  quick = permutation_test(quick_k3["exact_rkl_seeds"], quick_k2["exact_rkl_seeds"])
  text = (f"The quick run's {int(quick['n_x'])} vs {int(quick['n_y'])} seeds cannot test it: no "
          f"distribution-free test on them goes below p = {quick['min_p']:.2g} (its Welch "
          f"{_p(quick_k3, quick_k2, 'exact_rkl')} rests on normality).")
  if not os.path.exists(os.path.join(ROOT, FULL, "results.json")):
    return text
  full = _load(FULL)
  if "grpo_stress" not in full:
    return text
  a, b = full["grpo_stress"]["summary"]["k3_as_loss"], full["grpo_stress"]["summary"]["k2_as_loss"]
  perm = permutation_test(a["exact_rkl_seeds"], b["exact_rkl_seeds"])
  smallest = (f" (the smallest p {int(perm['n_x'])} vs {int(perm['n_y'])} seeds can give: every k3 "
              f"seed ends above every k2 seed)" if perm["p"] <= perm["min_p"] * (1 + 1e-9) else "")
  return (text + f" The full run ([`{FULL}/report.md`]({FULL}/report.md): {int(perm['n_x'])} vs "
          f"{int(perm['n_y'])} seeds, {full['meta']['settings']['stress_steps']} steps) ends at "
          f"{_msr(a, 'exact_rkl')} (k3) vs {_msr(b, 'exact_rkl')} (k2): Welch "
          f"{_p(a, b, 'exact_rkl')}, exact permutation p = {perm['p']:.2g}{smallest}.")


def cost(results: dict) -> str:
  meta = results["meta"]
  return (f"What the quick run costs: {meta['seconds'] / 60:.1f} minutes on {meta['machine']}, "
          f"the summed wall time of the runs in the committed report (`meta.seconds` of "
          f"[`results.json`]({QUICK}/results.json); how it was measured: "
          f"[`timing.txt`]({QUICK}/timing.txt)).\n")


def bandit(results: dict) -> str:
  order = ("k1_in_reward", "k2_as_loss", "k3_value_k2_grad", "k1_as_loss", "k3_as_loss",
           "k3_in_reward")
  rows: dict[tuple, list[str]] = {}
  for term in order:
    d = results["bandit"][f"{term} @ exact"]
    cells = tuple(f"**{d[k]:.2e}**" if k == d["nearest"] else f"{d[k]:.2e}"
                  for k in ("tv_star", "tv_fkl", "tv_zero"))
    rows.setdefault(cells, []).append(f"`{term}`")
  lines = ["| KL term | TV to π* (reverse-KL opt.) | TV to forward-KL opt. | TV to β=0 opt. |",
           "|---|---|---|---|"]
  lines += [f"| {', '.join(terms)} | " + " | ".join(cells) + " |" for cells, terms in rows.items()]
  return "\n".join(lines) + "\n"


def grpo(results: dict) -> str:
  s = results["meta"]["settings"]
  return (f"GRPO, on-policy, quick run ({s['steps']} steps, {s['seeds']} seeds, β = {s['beta']}; "
          f"final = mean of the last {s['final_window']} steps, mean ± sample std over seeds; the "
          f"whole report is [`{QUICK}/report.md`]({QUICK}/report.md)):\n\n"
          + report.grpo_table(results["grpo"]))


def claims(results: dict) -> str:
  v, g, o = results["verdicts"], results["grpo"], results["oracle"]
  on_tok, off_tok = o["one token, on-policy"], o["one token, off-policy"]
  k1, none, k2, k3 = g["k1_as_loss"], g["none"], g["k2_as_loss"], g["k3_as_loss"]
  out = []

  nearest = results["bandit"]["k1_as_loss @ exact"]["nearest"]
  out.append(
      f"1. **k1 as loss gives no regularization: {v['1_k1_as_loss_no_regularization']['verdict']}.**"
      f" Its exact expected gradient has norm {on_tok['k1_as_loss']['grad_norm']:.1e} and the "
      f"bandit ends nearest the {OPTIMA[nearest]}; in GRPO its final KL is "
      f"{_msr(k1, 'exact_rkl')} against {_msr(none, 'exact_rkl')} with no KL "
      f"({_p(k1, none, 'exact_rkl')}) and {_msr(k2, 'exact_rkl')} with k2 as loss; reward "
      f"{k1['reward'] - none['reward']:+.4f} ({_p(k1, none, 'reward')}) and entropy "
      f"{k1['entropy'] - none['entropy']:+.4f} ({_p(k1, none, 'entropy')}) from no KL.")

  t = results["trajectory"]
  split = min(x["identical_batches_until_step"] for x in t)
  together = (f"sample the same tokens at every one of {t[0]['steps']} steps in each of {len(t)} "
              f"seeds" if all(x["identical_batches_until_step"] == x["steps"] for x in t) else
              f"sample the same tokens for the first {split} steps (at least) of {t[0]['steps']}")
  out.append(
      f"2. **k2 as loss = k1 in reward on-policy: "
      f"{v['2_k2_as_loss_equals_k1_in_reward']['verdict']}.** With identical seeds the two GRPO "
      f"runs {together} (checked by a per-step hash of the token array) and end with parameters "
      f"that differ by at most {max(x['final_rel_param_distance'] for x in t):.1e} (relative).")

  regimes = results["regimes"]
  exact = {(r["term"], r["pi_ref_best"], r["beta"]): r["final_rkl"] for r in regimes
           if r["gradients"] == "exact"}
  bound = regime_boundary(regimes, "k3_as_loss")
  onset = [b * math.log(1 / ps[0]) for b, ps in bound.items() if ps]
  at = bound.get(0.5, [])
  regime = (f"k3 as loss ends, at β = 0.5, with ≥ 10× and ≥ 0.1 nats more KL(π‖π_ref) than k2 for "
            f"π_ref(best) ≤ {at[0]:g} (at π_ref(best) = 1e-4: {exact[('k3_as_loss', 1e-4, 0.5)]:.3g} "
            f"against {exact[('k2_as_loss', 1e-4, 0.5)]:.2g} nats)" if at else
            "k3 as loss ends, at β = 0.5, nowhere with ≥ 10× and ≥ 0.1 nats more KL(π‖π_ref) "
            "than k2")
  verl = VERL_K3
  worst = max(((p, b) for (t_, p, b) in exact if t_ == verl),
              key=lambda k: exact[(verl, *k)] - exact[("k2_as_loss", *k)])
  text = (f"3. **k3 as loss regularizes more weakly than k2: "
          f"{v['3_k3_as_loss_weaker_than_k2']['verdict']}.** Every variant and seed starts from "
          f"one shared warm start (the seeds vary only the RL sampling). Where RL sharpens a mode "
          f"the reference already covers (the warm-start GRPO runs) the final KLs of k3 and k2 are "
          f"{_msr(k3, 'exact_rkl')} and {_msr(k2, 'exact_rkl')} (Welch {_p(k3, k2, 'exact_rkl')}). "
          f"Where the reward sits on mass the reference barely covers (the bandit with one "
          f"rewarded arm, exact gradients) {regime}; the verl-style clamp at ±10 ends at "
          f"{exact[(verl, *worst)]:.3g} nats at π_ref(best) = {worst[0]:g}, β = {worst[1]:g} "
          f"(k3 as loss {exact[('k3_as_loss', *worst)]:.3g}, k2 {exact[('k2_as_loss', *worst)]:.2g})"
          + (f". On the grid a run is in that regime when the completions it must learn have "
             f"ln(1/π_ref) above about {min(onset):.1f}/β to {max(onset):.1f}/β nats (the report "
             f"gives it per β)." if onset else "."))
  seq = results["sequence"]
  st = seq["terms"]
  noise = seq["noise"]
  text += (f"\n\n   ![k3 / k2 regime map]({QUICK}/{report.regime_file('k3_as_loss')})\n\n"
           f"   In exact sequences (V = {seq['vocab']}, T = {seq['length']}, π_ref(y*) = "
           f"{seq['ref_prob_target']:.0e}, β = {seq['beta']:g}, "
           f"{len(st['k2_as_loss']['final_rkl_seeds'])} seeds) the final sequence KL(π‖π_ref) is "
           f"{mean_std(st['k2_as_loss']['final_rkl_seeds'])} for per-token k2 as loss, "
           f"{mean_std(st['k3_as_loss']['final_rkl_seeds'])} for k3 as loss and "
           f"{mean_std(st['k1_in_reward_rtg']['final_rkl_seeds'])} for the sequence-exact "
           f"`k1_in_reward_rtg`; the median noise std/‖E g‖ of the sampled KL gradient is "
           f"{np.median(noise['k3_as_loss']):.3g} for k3 against {np.median(noise['k2_as_loss']):.3g}"
           f" for k2 (evidence about the variance of the sampled gradient, not a regime that "
           f"confirms the claim).")
  stress = results["grpo_stress"]
  a, b = stress["summary"]["k3_as_loss"], stress["summary"]["k2_as_loss"]
  st = stress["stability"]
  target = stress.get("target")
  rare = (f", whose fully rewarded completion {target['text']!r} has mean log π_ref "
          f"{target['mean_log_ref']:.1f} nats" if target else "")
  text += (f" The stressing reward was designed after a search of GRPO configurations that found "
           f"no difference between k2 and k3 ([`{STRESS_SEARCH}`]({STRESS_SEARCH})): a "
           f"constructed regime. The stressing GRPO run ({stress['description']}{rare}) ends at "
           f"final KL {_msr(a, 'exact_rkl')} (k3) vs {_msr(b, 'exact_rkl')} (k2), reward "
           f"{_msr(a, 'reward')} vs {_msr(b, 'reward')}; the largest log π/π_ref of a sampled "
           f"completion was {st['k3_as_loss']['max_seq_log_ratio']:.1f} (k3) vs "
           f"{st['k2_as_loss']['max_seq_log_ratio']:.1f} (k2) nats. {_stress_test(a, b)}"
           f"\n\n   ![GRPO stress curves]({QUICK}/grpo_stress.png)")
  out.append(text)

  means = results["off_policy_means"]
  off = results["grpo_off_policy"]
  exact_fixes = [c for c in OFF_POLICY[1:] if off_tok[c]["to_rkl"] < 1e-4]
  clipped = [c for c in OFF_POLICY if "kl_grad_zeroed_fraction" in means.get(c, {})
             and c.endswith("+clipped")]
  fixes = " and ".join(f"`{c.removeprefix('k2_as_loss')}`" for c in exact_fixes)
  out.append(
      f"4. **Off-policy corrections: {v['4_off_policy_correction']['verdict']}.** Uncorrected k2 "
      f"as loss is biased ({off_tok['k2_as_loss']['to_rkl']:.1e} from ∇RKL in the oracle), "
      f"{fixes or 'no correction'} "
      f"{'is' if len(exact_fixes) == 1 else 'are'} exact. GRPO off-policy final KL: " + ", ".join(
          f"`{c}` {_msr(off[c], 'exact_rkl')}" + ("" if c == "k2_as_loss" else
                                                  f" ({_p(off[c], off['k2_as_loss'], 'exact_rkl')})")
          for c in OFF_POLICY) + f" (p against uncorrected; differs means p < {ALPHA})."
      + "".join(f" `{c}` removed the KL gradient of "
                f"{100 * means[c]['kl_grad_zeroed_fraction']:.2f}% of the tokens." for c in clipped))
  return "\n".join(out) + "\n"


def reward_stage(results: dict) -> str:
  e = results["reward_stage"]
  names = {"exact_rkl": "final KL", "reward": "reward", "entropy": "entropy"}
  text = ("Measured (quick, `k1_in_reward` after vs before normalization): " + ", ".join(
      f"{names[m]} {x['after_norm']:.4f} vs {x['before_norm']:.4f} (p = {x['p']:.2g})"
      for m, x in e.items()) + ".")
  r = results.get("reward_at")
  if r:
    x = r["exact_rkl"]
    text += (f" Off-policy (`k1_in_reward`, {results['meta']['settings']['off_policy_epochs']} "
             f"epochs × {results['meta']['settings']['off_policy_minibatches']} minibatches a "
             f"rollout), the penalty held from rollout vs recomputed at the current parameters "
             f"(`kl.reward_at`): final exact KL {x['rollout']:.4f} ± {x['rollout_seed_std']:.4f} "
             f"vs {x['current']:.4f} ± {x['current_seed_std']:.4f} (difference "
             f"{x['difference']:+.4f}, Welch p = {x['p']:.2g}, exact permutation p = "
             f"{x['permutation_p']:.2g}" + (f", the smallest these seeds can give is "
                                             f"{x['permutation_min_p']:.2g}"
                                             if x["permutation_min_p"] >= ALPHA else "") + ").")
  return text + "\n"


def full_note() -> str:
  path = os.path.join(ROOT, FULL, "results.json")
  if os.path.exists(path) and "regimes" in _load(FULL):
    r = _load(FULL)
    s = r["meta"]["settings"]
    return (f"The full report, [`{FULL}/report.md`]({FULL}/report.md) ({s['seeds']} seeds × "
            f"{s['steps']} steps, every KL term in the oracle table; "
            f"{r['meta']['seconds'] / 60:.0f} minutes on {r['meta']['machine']}), gives the same "
            f"study with more seeds: claim 3 there is "
            f"\"{r['verdicts']['3_k3_as_loss_weaker_than_k2']['verdict']}\".\n")
  return (f"The full report in [`{FULL}/report.md`]({FULL}/report.md) predates this study (no "
          f"regime map, sequence study or stress run; population std and the old 2×std rule) and "
          f"was not regenerated.\n")


def studies(results: dict) -> str:
  """The beyond-the-paper studies of the quick report: sequence ∇RKL noise and stale rollouts."""
  from experiments.studies import sequence_variance, staleness

  st = results.get("studies") or {}
  if not st:
    return "The committed quick report ran without these studies (`--config.studies=none`).\n"
  seq = [r for r in sequence_variance.summary(st["sequence_variance"])
         if r["pair"] == "sequence ∇RKL" and r["length"] > 1]
  model = st["sequence_variance"].get("model")
  lengths = sorted({r["length"] for r in seq})
  text = (f"Measured in the committed quick report: one batch's std/‖E g‖ of `exact_rkl_rb` is "
          f"{min(r['ratio'] for r in seq):.1f}–{max(r['ratio'] for r in seq):.1f}× lower than "
          f"`k1_in_reward_rtg`'s on tabular sequences (T = "
          f"{', '.join(map(str, lengths))}), and zero at T = 1")
  if model is not None:
    text += (f"; on the `{model['settings']['preset']}` decoder the gradient's spread is "
             f"{model['ratio']:.2f}× lower")
  g = st["staleness"]["grpo"]
  kls = "; ".join(f"{name}: {staleness._last(cur['exact_rkl']):.4f}"
                  for name, cur in g["runs"].items())
  text += (f". GRPO with stale rollouts ({g['steps']} steps, {g['seeds']} seed(s), "
           f"`k2_as_loss`, β = {g['beta']}), final exact KL per token — {kls} "
           f"(one short run per variant: a smoke test of the machinery, not evidence for or "
           f"against the KL correction).\n")
  return text


PEERS = {24: "benchmarks/results/vs_peers_24layers.json", 4: "benchmarks/results/vs_peers_4layers.json"}


def peers() -> str:
  """The speed table of benchmarks/vs_peers.py's committed runs (one per depth)."""
  out = []
  for layers, path in PEERS.items():
    with open(os.path.join(ROOT, path)) as f:
      r = json.load(f)
    peak = r["matmul_peak_gflops"]
    assert r["shape"]["layers"] == layers, path
    out += [f"**{layers} layers** (`{r['command']}`, [JSON]({path}); {r['timed_iterations_per_side']}"
            f" timed iterations a side, medians; matmul peak XLA {peak['xla']:.0f}, torch "
            f"{peak['torch']:.0f} GFLOP/s):", "",
            "| side | GRPO iteration s | CPU s (user+sys) | update s | sampler tokens/s |",
            "|---|---|---|---|---|"]
    for side, label in (("kljax", "kljax"), ("trl", "TRL 1.16"), ("tunix", "tunix 0.1.7"),
                        ("hf_generate", "HF `generate`")):
      x = r[side]
      cell = lambda key, d: "–" if x.get(key) is None else f"{x[key]:,.{d}f}"  # noqa: E731
      out.append(f"| {label} | {cell('iteration_s', 2)} | {cell('cpu_s', 1)} | "
                 f"{cell('update_s', 2)} | {cell('sampler_tokens_per_s', 1)} |")
    out += [""] + [f"- {t['name']}: {t['value']:.2f} (target {t['bound']} {t['target']:.2f}): "
                   + ("met" if t["met"] else f"**missed** by {abs(t['value'] - t['target']):.2f}")
                   for t in r["targets"]] + [""]
  return "\n".join(out)


ENGINES = ("benchmarks/results/vllm_engine_small.json",
           "benchmarks/results/vllm_engine_qwen2.5-0.5b.json")
ENGINE_RUNS = "benchmarks/results/vllm_grpo.json"


def engines() -> str:
  """The rollout engines' table (benchmarks/vllm_engine.py's committed runs): tokens/s of the
  vllm and jax engines and HF generate, the weight push, and the GRPO runs on each engine."""
  out = ["| shape | tokens/s: vllm · jax engine · HF `generate` | a batch's wall / CPU s: vllm · "
         "jax · HF | vLLM start-up s | weight push + sync check: wall / CPU s | sync gap float32 "
         "/ bfloat16 |", "|---|---|---|---|---|---|"]
  notes = []
  for path in ENGINES:
    with open(os.path.join(ROOT, path)) as f:
      r = json.load(f)
    sh, v = r["shape"], r["vllm"]
    sides = (v, r["jax"], r["hf_generate"])
    out.append(f"| [{sh['preset']}]({path}) ({sh['layers']} layers, {sh['prompts']}×{sh['group']} "
               f"samples × {sh['new_tokens']} tokens) | "
               + " · ".join(f"{x['tokens_per_s']:,.1f}" for x in sides) + " | "
               + " · ".join(f"{x['wall_s']:.2f} / {x['cpu_s']:.2f}" for x in sides)
               + f" | {v['startup_s']:.1f} | {v['push_s']:.2f} / {v['push_cpu_s']:.2f} | "
               f"{v['sync_gap_float32']:.1e} / {v.get('sync_gap_bfloat16', float('nan')):.1e} |")
    notes.append(f"- {sh['preset']}: vllm decodes at {r['ratios']['vllm_over_jax']:.2f}× the jax "
                 f"engine's tokens/s and {r['ratios']['vllm_over_hf']:.2f}× HF `generate`'s; its "
                 f"weight push + sync check takes {v['push_s']:.2f} s against {v['wall_s']:.2f} s "
                 f"for the batch's decode ({'more' if v['push_s'] > v['wall_s'] else 'less'}).")
  out += [""] + notes
  with open(os.path.join(ROOT, ENGINE_RUNS)) as f:
    g = json.load(f)
  n = len(next(iter(g["runs"].values()))["reward_mean"])
  out += ["", f"GRPO on arithmetic, `small` preset, {n} steps, k3_as_loss β = 0.05 (`{g['command']}`,"
          f" [JSON]({ENGINE_RUNS}), [figure]({ENGINE_RUNS[:-5]}.png)); means over the last 10 steps:",
          "", r"| run | reward | exact KL(π‖π_ref) | sampler ESS | \|log μ − log π_old\| | "
          "tokens corrected | wall s |", "|---|---|---|---|---|---|---|"]
  last = lambda xs: sum(xs[-10:]) / len(xs[-10:])  # noqa: E731
  for name, run in g["runs"].items():
    out.append(f"| `{name}` | {last(run['reward_mean']):.3f} | {last(run['exact_rkl']):.4f} | "
               f"{last(run['sampler_ess']):.4f} | {last(run['sampler_logprob_gap']):.1e} | "
               f"{last(run['sampler_corrected_fraction']):.4f} | {run['wall_s']:.0f} |")
  out.append("")
  for mismatch, (pg, both) in (("bfloat16", ("vllm_bf16_tis_pg", "vllm_bf16_tis_pg_kl")),
                               ("temperature 0.7", ("vllm_t0.7_tis_pg", "vllm_t0.7_tis_pg_kl"))):
    a, b = (g["runs"][k]["exact_rkl"][-10:] for k in (pg, both))
    diff = abs(sum(b) / len(b) - sum(a) / len(a))
    spread = max(statistics.pstdev(a), statistics.pstdev(b))
    out.append(f"- {mismatch} sampler: the exact KL with the correction on the policy gradient and "
               f"the KL term vs on the policy gradient only differs by {diff:.4f} over the last 10 "
               f"steps, {'less' if diff < spread else 'more'} than either run's step-to-step spread "
               f"({spread:.4f}).")
  return "\n".join(out + [""])


def suite_cost() -> str:
  """What the quickstart's test command costs, as `python -m experiments.suite_cost` measured it."""
  with open(os.path.join(ROOT, SUITE_COST)) as f:
    s = json.load(f)
  peak = (f" and a peak of {s['peak_rss_gb']:.1f} GB resident memory"
          if s.get("peak_rss_gb") is not None else "")
  return (f"The test suite takes about {s['pytest_seconds'] / 60:.0f} minutes on {s['cpus']} CPU "
          f"cores ({s['tests_passed']} tests, pytest's own {s['pytest_seconds']:.0f} s on "
          f"{s['date']}, measured by `python -m experiments.suite_cost` into "
          f"[`suite_cost.json`]({SUITE_COST})){peak}; it compiles with LLVM at -O0 as "
          f"tests/conftest.py sets, so it is compile-bound.\n")


CHECKPOINT_COST = "benchmarks/results/checkpoint.json"
CHECKPOINT_TARGET = 1.10  # verification costs at most 10% more than orbax alone


def checkpoint_cost() -> str:
  """What verified checkpoints cost against orbax alone, from benchmarks/checkpoint.py's JSON:
  medians per run, as the range over its runs."""
  with open(os.path.join(ROOT, CHECKPOINT_COST)) as f:
    r = json.load(f)
  n = len(next(iter(r["presets"].values()))["runs"])

  def span(xs, fmt):
    lo, hi = f"{min(xs):{fmt}}", f"{max(xs):{fmt}}"
    return lo if lo == hi else f"{lo}–{hi}"

  out = [f"`{r['command']}` ([JSON]({CHECKPOINT_COST}), {r['date']}): {n} runs of {r['reps']} "
         f"repetitions on {r['cpus']} CPU cores, local disk. Seconds are medians; the ratio is the "
         "median of paired per-repetition ratios; CPU seconds are user + system of every thread of "
         "the process (orbax writes in background threads); each cell is the range over the runs:",
         "", "| State | | orbax alone | kljax, verified | kljax / orbax | CPU s: orbax · kljax |",
         "|---|---|---|---|---|---|"]
  notes = []
  for preset, x in r["presets"].items():
    for i, (kind, label) in enumerate((("stall", "stall of the training loop"),
                                       ("save", "save, until on disk"), ("restore", "restore"))):
      cells = [span([run[kind][side] for run in x["runs"]], ".3f") + " s"
               for side in ("orbax", "kljax")]
      ratios = [run[kind]["ratio"] for run in x["runs"]]
      state = f"`{preset}` ({x['mb']:,.1f} MB)" if i == 0 else ""
      cpu = " · ".join(span([run[kind][f"{side}_cpu"] for run in x["runs"]], ".3f")
                       for side in ("orbax", "kljax"))
      out.append(f"| {state} | {label} | {cells[0]} | {cells[1]} | {span(ratios, '.2f')}× "
                 f"| {cpu} |")
    median = lambda kind: statistics.median(run[kind]["kljax"] for run in x["runs"])  # noqa: E731
    verdicts = []
    for kind in ("stall", "save", "restore"):
      ratio = statistics.median(run[kind]["ratio"] for run in x["runs"])
      within = "within" if ratio <= CHECKPOINT_TARGET else "over"
      verdicts.append(f"{kind} {ratio:.2f}× ({within})")
    notes.append(f"- `{preset}`: the digest alone (`tree_digest`, CRC-32 on a few threads) takes "
                 f"{x['digest_s']:.3f} s, {x['digest_s'] / median('save'):.0%} of a verified save "
                 f"and {x['digest_s'] / median('restore'):.0%} of a verified restore; against the "
                 f"target of {CHECKPOINT_TARGET - 1:.0%} more than orbax, the runs' median ratios "
                 f"are: {', '.join(verdicts)}.")
  return "\n".join(out + [""] + notes + [""])


def plan_table() -> str:
  """The scale table, as `python -m experiments.plan --table` wrote it."""
  with open(os.path.join(ROOT, PLAN_TABLE)) as f:
    return f.read()


def contents() -> dict[str, str]:
  """{block name: content} of every generated block, its links relative to its file (TARGETS)."""
  quick = _load(QUICK)
  generated = {"speed:peers": peers(), "engines:vllm": engines(), "plan:table": plan_table(),
               "suite:cost": suite_cost(), "checkpoint:cost": checkpoint_cost(),
               "reproduce:cost": cost(quick), "reproduce:bandit": bandit(quick),
               "reproduce:grpo": grpo(quick), "reproduce:claims": claims(quick),
               "reproduce:reward_stage": reward_stage(quick), "reproduce:full": full_note(),
               "reproduce:studies": studies(quick)}
  assert set(generated) == set(TARGETS), sorted(set(generated) ^ set(TARGETS))
  return {name: relink(content, TARGETS[name]) for name, content in generated.items()}


def by_file(generated: dict[str, str]) -> dict[str, dict[str, str]]:
  """{file: {block name: content}} of `generated` ({block name: content})."""
  out: dict[str, dict[str, str]] = {}
  for name, content in generated.items():
    out.setdefault(TARGETS[name], {})[name] = content
  return out


def read(path: str) -> str:
  """The text of `path` (relative to the repository root)."""
  with open(os.path.join(ROOT, path)) as f:
    return f.read()


def stale_files(generated: dict[str, str] | None = None) -> list[str]:
  """'FILE: BLOCK' for each block whose committed text differs from what it generates."""
  generated = contents() if generated is None else generated
  return [f"{path}: {name}" for path, blocks in by_file(generated).items()
          for name in stale_blocks(read(path), blocks)]


def main(argv: list[str]) -> int:
  generated = contents()
  if "--check" in argv[1:]:
    stale = stale_files(generated)
    if stale:
      print(f"stale generated blocks ({'; '.join(stale)}): run python -m experiments.readme",
            file=sys.stderr)
      return 1
    return 0
  for path, blocks in by_file(generated).items():
    text = read(path)
    for name, content in blocks.items():
      text = replace_block(text, name, content)
    with open(os.path.join(ROOT, path), "w") as f:
      f.write(text)
    print(f"wrote {len(blocks)} block(s) of {path}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main(sys.argv))
