"""kljax.audit: verdicts for every built-in term (expected by hand), the enumeration against
kljax.exact's chain-rule divergences, aggregation with variable lengths, torch functions, numerics
probes, errors, the command line and the generated tables."""

import ast
import os
import re
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import kljax
from experiments import audit_docs
from kljax import audit, exact, gradient_table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ONE_TOKEN = (audit.SETTINGS[0],)

# ---- every built-in name: the on-policy one-token verdict, written by hand with its reason ----

# c = ∂k/∂logp as loss, c = k in reward; δ = π_ref/π. A live ratio adds the value (product rule).
HAND = {
    "k1_as_loss": ("0", "c = ∂k1/∂logp = 1, and E[∇logp] = 0"),
    "k2_as_loss": ("∇RKL", "c = logp − ref_logp"),
    "k3_as_loss": ("∇FKL", "c = 1 − δ, and E_π[(1 − δ)∇logp] = ∇KL(π_ref‖π)"),
    "k1_in_reward": ("∇RKL", "c = k1 = logp − ref_logp"),
    "k1_in_reward_rtg": ("∇RKL", "one token: reward-to-go is the token's own k1"),
    "k2_in_reward": ("biased", "c = ½(log δ)²: no divergence has this coefficient"),
    "k2_in_reward_rtg": ("biased", "as k2_in_reward for one token"),
    "k3_in_reward": ("biased", "c = δ − 1 − log δ = (log π − log π_ref) − (1 − δ): ∇RKL − ∇FKL"),
    "k3_in_reward_rtg": ("biased", "as k3_in_reward for one token"),
}
_GRAD_VERDICT = {"k1": "0", "k2": "∇RKL", "k3": "∇FKL"}  # as loss, by the gradient estimator
# With a live ratio: c = ∂k_grad + k_value.
_RATIO_VERDICT = {
    ("k1", "k1"): ("∇RKL", "c = 1 + k1: the constant drops out"),
    ("k2", "k2"): ("biased", "c = k1 + k2 (Liu et al.: a live ratio biases k2)"),
    ("k3", "k3"): ("∇RKL", "c = (1 − δ) + (δ − 1 − log δ) = −log δ"),
    ("k1", "k2"): ("∇RKL", "c = k1 + k1 = 2·(logp − ref_logp): ∇RKL with β doubled"),
    ("k1", "k3"): ("biased", "c = (1 − δ) + k1"),
    ("k2", "k1"): ("biased", "c = 1 + ½(log δ)²"),
    ("k2", "k3"): ("biased", "c = (1 − δ) + ½(log δ)²"),
    ("k3", "k1"): ("biased", "c = 1 + δ − 1 − log δ = δ − log δ"),
    ("k3", "k2"): ("biased", "c = k1 + k3"),
}


def _hand(name):
  base, _, correction = name.partition("+")
  if base in HAND and not correction:
    return HAND[base]
  if correction == "value_clamp":  # verl's low_var_kl: k3 clipped to [−10, 10]
    return "∇FKL", "c = 1 − δ inside the clamp (|log δ| small here), 0 past it"
  value_est, grad_est = (base[:2], base[:2]) if base.endswith("_as_loss") else (base[:2], base[-7:-5])
  if correction == "ratio":
    return _RATIO_VERDICT[(value_est, grad_est)]
  # detached ratio and clipped head: ρ ≡ 1 on-policy, inside the clip range
  return _GRAD_VERDICT[grad_est], f"c = ∂{grad_est}/∂logp; the correction is inert on-policy"


def _follows(verdict):
  return verdict.split(" (×")[0].removeprefix("follows ")


@pytest.mark.parametrize("name", kljax.kl_term_names())
def test_builtin_term_on_policy_verdict_by_hand(name):
  expected, reason = _hand(name)
  report = audit.audit(name)
  assert report.on_policy == expected, f"{name}: {reason}; audit: {report.settings[0].verdict}"
  if name == "k1_value_k2_grad+ratio":
    assert report.settings[0].verdict == "follows ∇RKL (×2)"


@pytest.mark.parametrize("name, setting, expected", [
    # per-token terms in a sequence follow each position's KL with the prefix law frozen
    ("k2_as_loss", 2, "frozen-prefix ∇RKL"),
    ("k3_as_loss", 2, "frozen-prefix ∇FKL"),
    # reward-to-go credit is the chain rule over prefixes: the whole sequence reverse KL
    ("k1_in_reward_rtg", 2, "∇RKL"),
    ("k1_in_reward_rtg", 4, "∇RKL"),  # variable lengths too
    # off-policy: uncorrected as-loss terms ignore π_old; sg(ρ)·k2 and ρ·k3 recover ∇RKL
    ("k2_as_loss", 1, "biased"),
    ("k2_as_loss+detached_ratio", 1, "∇RKL"),
    ("k3_as_loss+ratio", 1, "∇RKL"),
    # a token's ratio does not correct its prefix
    ("k3_as_loss+ratio", 3, "frozen-prefix ∇RKL, prefixes from π_old"),
    # in reward, penalty at rollout (from π_old): ∇RKL − ∇KL(π‖π_old) (tests/test_audit_offpolicy.py)
    ("k1_in_reward", 1, "biased"),
])
def test_builtin_term_other_settings(name, setting, expected):
  assert audit.audit(name).settings[setting].follows == expected


def test_in_reward_penalty_at_the_current_parameters_is_importance_weighted_through_rho():
  assert audit.audit("k1_in_reward", penalty_at="current").settings[1].follows == "∇RKL"


def test_enumeration_targets_equal_the_chain_rule_divergences():
  # The audit's enumeration (with masks) against kljax.exact's analytic chain-rule gradients.
  s = audit.SETTINGS[3]
  policy, ref, old = gradient_table.policies(s, 0)
  got = exact.divergence_gradients(policy, ref, old=old, space=gradient_table.space_of(s))
  want = {"∇RKL": exact.rkl_grad(policy, ref), "∇FKL": exact.fkl_grad(policy, ref),
          "frozen-prefix ∇RKL, prefixes from π_θ": exact.frozen_prefix_rkl_grad(policy, ref),
          "frozen-prefix ∇FKL, prefixes from π_θ": exact.frozen_prefix_fkl_grad(policy, ref),
          "frozen-prefix ∇RKL, prefixes from π_old": exact.frozen_prefix_rkl_grad(policy, ref,
                                                                                 prefixes=old),
          "frozen-prefix ∇FKL, prefixes from π_old": exact.frozen_prefix_fkl_grad(policy, ref,
                                                                                 prefixes=old)}
  assert set(got) == set(want)
  for k in want:
    np.testing.assert_allclose(gradient_table.flat(got[k]), gradient_table.flat(want[k]),
                               rtol=1e-5, atol=1e-7)


# In-reward terms with the penalty at the current θ: the audit runs the term's own surrogate, as
# the oracle table does (at rollout it models the trainer's held penalty instead).
_ONE_ENGINE = (("k1_as_loss", None), ("k2_as_loss", None), ("k3_as_loss", None),
               ("k2_as_loss+detached_ratio", None), ("k3_as_loss+ratio", None),
               ("k1_in_reward_rtg", "current"))


@pytest.mark.parametrize("name, penalty_at", _ONE_ENGINE)
def test_the_audit_and_the_oracle_table_are_one_engine(name, penalty_at):
  """README.md's terms table (the audit) and the reproduction's oracle table (gradient_table.table)
  label a gradient alike: on the audit's settings, to the last digit; on the oracle's own settings
  (other seeds and policy scale), the same verdicts in the settings both have."""
  report = audit.audit(name, penalty_at=penalty_at, seeds=1)
  for s, r in zip(audit.SETTINGS, report.settings):
    (row,) = gradient_table.table([name], settings=(s,))
    want = r.follows if r.follows in ("0", "biased") else r.verdict.removeprefix("follows ")
    assert row.follows == want, (s.name, row.follows, r.verdict)
    assert row.to_rkl == r.distance["∇RKL"] and row.to_fkl == r.distance["∇FKL"], s.name
  oracle = {row.setting: row.follows for row in gradient_table.table([name])}
  shared = {"one token, on-policy": 0, "one token, off-policy": 1,
            "sequence, per-token terms, on-policy": 2, "sequence, per-token terms, off-policy": 3}
  for setting, i in shared.items():
    assert oracle[setting].split(" (×")[0] == report.settings[i].follows, (
        setting, oracle[setting], report.settings[i].verdict)


def test_eos_space_is_a_distribution_of_variable_length_sequences():
  s = audit.SETTINGS[4]
  space = gradient_table.space_of(s)
  policy, _, _ = gradient_table.policies(s, 0)
  probs = exact.space_probs(exact.token_logprobs(policy, space.seqs), space)
  np.testing.assert_allclose(float(jnp.sum(probs)), 1.0, rtol=1e-5)
  # Canonical sequences: 1 + 2 + 4 + 8 (EOS at position 0..3) + 16 without EOS, V=3, T=4.
  assert int(jnp.sum(space.keep)) == 1 + 2 + 4 + 8 + 16


def test_aggregation_changes_the_target_only_through_per_sequence_weights():
  eos = (audit.SETTINGS[4],)
  assert audit.audit("k1_in_reward_rtg", settings=eos).on_policy == "∇RKL"
  # token_mean divides by the constant E|y|: the same direction, a rescaled β
  scaled = audit.audit("k1_in_reward_rtg", settings=eos, aggregation="token_mean").settings[0]
  assert scaled.follows == "∇RKL" and "(×" in scaled.verdict
  lo, hi = scaled.scale["∇RKL"]
  assert 1 / 4 < lo <= hi < 1  # 1/E|y| with 1 ≤ |y| ≤ 4
  # 1/|y| per sequence weighs short sequences up: no longer a divergence's gradient
  assert audit.audit("k1_in_reward_rtg", settings=eos,
                     aggregation="seq_mean_token_mean").settings[0].follows == "biased"


def test_sequence_level_application_of_an_elementwise_penalty():
  # k1 of the whole sequence's log-prob, in reward: c = log P(y) − log P_ref(y), the score of the
  # sequence: exactly ∇ of the sequence reverse KL.
  report = audit.audit(kljax.k1, placement="reward", level="sequence")
  assert report.settings[2].follows == "∇RKL"


def test_verl_style_value_clamp_is_found():
  def clamped_k3(logp, ref_logp):
    ld = ref_logp - logp
    return jnp.clip(jnp.exp(ld) - ld - 1, -10.0, 10.0)

  report = audit.audit(clamped_k3)
  assert report.on_policy == "∇FKL"  # ordinary log-ratios: the clamp is inactive
  z = report.robustness["zeroed"]
  # k3 = 10 at log δ ≈ 2.61 (e^x − x − 1 = 10) and at log δ ≈ −11 (−x − 1 = 10 − e^x); grid 0.5
  assert z["above"] == 3.0 and z["below"] == -11.0
  # exp overflows in float32 past log δ ≈ 88.7: the clip's gradient is then NaN
  assert report.robustness["float32"]["nonfinite_grad"] > 0
  assert audit.audit("k3_as_loss").robustness["float32"]["nonfinite_grad"] == 0
  assert audit.audit("k3_as_loss").robustness["zeroed"] == {"above": None, "below": None}
  # The built-in name: the same clamp, found at the same places, but no overflow (kljax's k3).
  builtin = audit.audit("k3_as_loss+value_clamp").robustness
  assert builtin["zeroed"] == {"above": 3.0, "below": -11.0}
  assert builtin["float32"]["nonfinite_grad"] == 0


def test_value_bias_of_the_estimators_is_exact():
  # Exact expectations: k1 and k3 are unbiased for KL(π‖π_ref), k2 is not.
  assert abs(audit.audit("k1_in_reward").value["relative_bias_rkl"]) < 1e-5
  assert abs(audit.audit("k3_as_loss").value["relative_bias_rkl"]) < 1e-5
  assert abs(audit.audit("k2_as_loss").value["relative_bias_rkl"]) > 1e-3


def test_coefficient_identification():
  assert audit.audit("k2_as_loss").coefficient["identified"] == "= log π − log π_ref (∇RKL)"
  assert audit.audit("k3_as_loss").coefficient["identified"] == "= 1 − δ (∇FKL)"
  assert audit.audit("k1_as_loss").coefficient["identified"] == "= constant (zero expected gradient)"
  assert audit.audit("k2_as_loss+ratio").coefficient["identified"].startswith("matches none")
  c = np.asarray(audit.audit("k3_as_loss+ratio").coefficient["values"])
  ld = np.asarray(audit.COEFFICIENT_GRID)
  np.testing.assert_array_less(np.abs(c + ld), 1e-4 * (1 + np.abs(ld)))


# ---- PyTorch functions ----

def _torch_k3(logp, ref_logp):
  ld = ref_logp - logp
  return torch.exp(ld) - ld - 1


def _torch_trl_k3_live_ratio(logp, ref_logp, old_logp, mask):
  ld = ref_logp - logp
  return torch.exp(logp - old_logp.detach()) * (torch.exp(ld) - ld - 1)


def test_torch_elementwise_function():
  fn = audit.from_torch(_torch_k3)
  lp, lq = jnp.log(jnp.array([0.2, 0.5])), jnp.log(jnp.array([0.4, 0.1]))
  np.testing.assert_allclose(fn(lp, lq), kljax.k3(lp, lq), rtol=1e-6)
  report = audit.audit(fn, settings=ONE_TOKEN)
  assert report.on_policy == "∇FKL"
  # naive torch k3 overflows past log δ ≈ 88.7 in float32: the probe sees it
  assert report.robustness["float32"]["nonfinite_value"] > 0


def test_torch_sequence_function_with_a_live_ratio_follows_reverse_kl():
  fn = audit.from_torch(_torch_trl_k3_live_ratio, signature="sequence")
  report = audit.audit(fn, signature="sequence", settings=audit.SETTINGS[:3])
  assert [r.follows for r in report.settings] == ["∇RKL", "∇RKL", "frozen-prefix ∇RKL"]


# ---- errors ----


def test_wrong_signature_shape_dtype_and_nonfinite_are_named():
  with pytest.raises(audit.AuditError, match=r"fn\(logp, ref_logp\).*TypeError"):
    audit.audit(lambda logp: logp)
  with pytest.raises(audit.AuditError, match=r"of shape \[2, 3\].*got \(\)"):
    audit.audit(lambda logp, ref: jnp.sum(logp - ref))
  with pytest.raises(audit.AuditError, match="expected a floating result, got dtype int32"):
    audit.audit(lambda logp, ref: (logp > ref).astype(jnp.int32))
  with pytest.raises(audit.AuditError, match="non-finite output"):
    audit.audit(lambda logp, ref: jnp.log(logp - ref))
  with pytest.raises(audit.AuditError, match="logp_t, ref_logp_t, old_logp_t, mask_t"):
    audit.audit(lambda a, b: a, signature="sequence")
  with pytest.raises(ValueError, match="aggregation must be one of"):
    audit.audit("k2_as_loss", aggregation="mean")


def test_assert_follows():
  audit.assert_follows("k2_as_loss", "reverse", setting="one token, on-policy")
  # per-token k2 follows each position's reverse KL on-policy; off-policy it ignores π_old
  audit.assert_follows("k2_as_loss", "frozen_reverse", setting=["token-on", "seq-on", "eos-on"])
  with pytest.raises(AssertionError, match="one token, off-policy: the gradient biased"):
    audit.assert_follows("k2_as_loss", "frozen_reverse")
  with pytest.raises(AssertionError, match="follows ∇FKL, not ∇RKL"):
    audit.assert_follows("k3_as_loss", "reverse", setting="token-on")
  audit.assert_follows(kljax.k1, "zero", setting=["token-on", "seq-on", "eos-on"])


# ---- the command line ----


def test_cli_in_process(tmp_path, monkeypatch, capsys):
  (tmp_path / "mykl.py").write_text(
      "import jax.numpy as jnp\n"
      "def k2(logp, ref_logp):\n  return 0.5 * (ref_logp - logp) ** 2\n"
      "def one(logp):\n  return logp\n")
  monkeypatch.chdir(tmp_path)
  assert audit.main(["mykl:k2", "--expect", "reverse", "--setting", "token-on", "--json", "r.json",
                     "--seeds", "1"]) == 0
  assert "follows ∇RKL" in capsys.readouterr().out and (tmp_path / "r.json").exists()
  assert audit.main(["mykl:k2", "--expect", "forward", "--setting", "token-on", "--seeds", "1"]) == 1
  # every setting by default: uncorrected off-policy k2 is biased, sequences frozen-prefix
  assert audit.main(["mykl:k2", "--expect", "reverse", "--seeds", "1"]) == 1
  assert "one token, off-policy: the gradient biased" in capsys.readouterr().out
  assert audit.main(["mykl:k2", "--placement", "reward", "--penalty-at", "current", "--json",
                     "p.json", "--seeds", "1"]) == 0
  assert '"penalty_at": "current"' in (tmp_path / "p.json").read_text()
  assert "recomputed **at the current parameters**" in capsys.readouterr().out
  assert audit.main(["nosuchmodule:k2"]) == 2
  assert "cannot import module 'nosuchmodule'" in capsys.readouterr().err
  assert audit.main(["mykl:k9"]) == 2
  assert "has no attribute 'k9'" in capsys.readouterr().err
  assert audit.main(["mykl:one"]) == 2
  assert "fn(logp, ref_logp)" in capsys.readouterr().err


def test_update_docs_left_the_command_line(capsys):
  # The library writes no documents: python -m experiments.audit_docs does.
  with pytest.raises(SystemExit) as e:
    audit.main(["--update-docs"])
  assert e.value.code == 2 and "--update-docs" in capsys.readouterr().err


def test_the_package_imports_at_module_level_only():
  """No import inside a function (the mark of an import circle broken by hand), except torch: an
  optional dependency that only audits of PyTorch code need."""
  package = os.path.join(ROOT, "kljax", "audit")
  for name in sorted(os.listdir(package)):
    if not name.endswith(".py"):
      continue
    with open(os.path.join(package, name)) as f:
      tree = ast.parse(f.read())
    for node in ast.walk(tree):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        for inner in ast.walk(node):
          if isinstance(inner, (ast.Import, ast.ImportFrom)):
            modules = [a.name for a in inner.names] if isinstance(inner, ast.Import) else [
                inner.module]
            assert modules == ["torch"], f"{name}:{inner.lineno} imports {modules} in {node.name}"


@pytest.mark.slow
def test_cli_pinned_command(tmp_path):
  png = tmp_path / "c.png"
  cmd = [sys.executable, "-m", "experiments.audit", "kljax:k3", "--placement", "loss", "--expect",
         "forward", "--setting", "token-on", "--plot", str(png)]  # kljax.audit's CLI and a figure
  out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
  assert out.returncode == 0, out.stderr
  assert "| one token, on-policy |" in out.stdout and "follows ∇FKL" in out.stdout
  assert png.stat().st_size > 10_000


# ---- generated tables can never go stale ----


# Distances at float32 rounding level (≤ 9.9e-06) print as whatever digits the machine code's
# rounding gives (fused multiply-adds or not, the CPU's vector width, the compiler's -O level): the
# staleness check reads every such number as one token, and every other character exactly.
_ROUNDING_LEVEL = re.compile(r"\b\d(?:\.\d+)?e-(?:0[6-9]|[1-9]\d)\b")


def _up_to_rounding(text: str) -> str:
  return _ROUNDING_LEVEL.sub("<1e-05", text)


def test_rounding_level_numbers_are_masked_and_others_are_not():
  assert _up_to_rounding("| 2.1e-07 | 3.0e-01 | 1e-12 | 9.9e-06 | 1.0e-05 |") == \
      "| <1e-05 | 3.0e-01 | <1e-05 | <1e-05 | 1.0e-05 |"


def test_the_generator_replaces_only_the_readme_block(tmp_path):
  readme = "intro\n<!-- BEGIN audit:terms -->\nold\n<!-- END audit:terms -->\nafter\n"
  (tmp_path / "README.md").write_text(readme)
  docs = {"README.md#terms": "new\n", "docs/kl_terms.md": "table\n"}
  assert audit_docs.stale(str(tmp_path), docs) == ["README.md", "docs/kl_terms.md"]
  audit_docs.update_docs(str(tmp_path), docs)
  assert (tmp_path / "README.md").read_text() == readme.replace("old", "new")
  assert (tmp_path / "docs" / "kl_terms.md").read_text() == "table\n"
  assert audit_docs.stale(str(tmp_path), docs) == []


@pytest.mark.slow
def test_generated_tables_are_committed():
  docs = audit_docs.generated_docs()
  with open(os.path.join(ROOT, "README.md")) as f:
    assert _up_to_rounding(audit_docs.readme_block(f.read())) == _up_to_rounding(
        docs.pop("README.md#terms")), (
        "README.md's terms table is stale: run python -m experiments.audit_docs")
  for path, content in docs.items():
    with open(os.path.join(ROOT, path)) as f:
      assert _up_to_rounding(f.read()) == _up_to_rounding(content), (
          f"{path} is stale: run python -m experiments.audit_docs")
