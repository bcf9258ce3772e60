"""kljax.audit off-policy: when an in-reward penalty is computed (at rollout or at the current
parameters), the prefix law of frozen-prefix targets, whole-sequence ratios, and `--expect` over
every setting. Each expected verdict is derived by hand in the comment above it; the gradients the
derivations name are computed independently (NumPy for one token, `kljax.exact` for sequences)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kljax
from kljax import audit, exact, gradient_table

sg = jax.lax.stop_gradient
TOKEN_ON, TOKEN_OFF, SEQ_ON, SEQ_OFF, EOS_ON = audit.SETTINGS
THETA, OLD = audit.PREFIX_THETA, audit.PREFIX_OLD


def _follows(report):
  return {r.setting: r.follows for r in report.settings}


# ---- in-reward k1: penalty at rollout vs at the current parameters ----
#
# Off-policy, y ~ π_old and the PPO ratio ρ_t = π(y_t|y_<t)/π_old(y_t|y_<t) multiplies the
# detached penalty c_t. Per position, E_{y_t~π_old}[ρ_t c_t ∇logπ_t] = Σ_v π(v) c(v) ∇logπ(v).
#  current: c = log π − log π_ref → Σ_v π (log π − log π_ref) ∇logπ = ∇KL(π_t‖π_ref,t).
#    One token: ∇RKL. Sequences, token credit: each position's ∇RKL with its prefix drawn from
#    π_old (the token ratio does not reweigh the prefix): frozen-prefix ∇RKL, prefixes from π_old.
#    Reward-to-go: c_t = Σ_{s≥t} k1_s(θ) with y_{>t} ~ π_old, weighted by ρ_t only: the future's
#    law is π_old's, so the sum is not the sequence RKL's score weight: biased (the prefix law).
#  rollout: c = log π_old − log π_ref = (log π − log π_ref) − (log π − log π_old) →
#    ∇KL(π‖π_ref) − ∇KL(π‖π_old) per position: one token ∇RKL − ∇KL(π‖π_old) ≠ any target
#    (biased); sequences with token credit: frozen-prefix (π_old prefixes) of the same difference
#    (biased); reward-to-go: biased as above, and more.
#  On-policy π_old = π: c(π_old) = c(π), so both modes give the on-policy verdicts: token credit
#    frozen-prefix ∇RKL (one token: ∇RKL), reward-to-go ∇RKL of the sequence.
PENALTY_VERDICTS = {
    ("k1_in_reward", "rollout"): ("∇RKL", "biased", "frozen-prefix ∇RKL", "biased",
                                  "frozen-prefix ∇RKL"),
    ("k1_in_reward", "current"): ("∇RKL", "∇RKL", "frozen-prefix ∇RKL",
                                  "frozen-prefix ∇RKL" + OLD, "frozen-prefix ∇RKL"),
    ("k1_in_reward_rtg", "rollout"): ("∇RKL", "biased", "∇RKL", "biased", "∇RKL"),
    ("k1_in_reward_rtg", "current"): ("∇RKL", "∇RKL", "∇RKL", "biased", "∇RKL"),
}


@pytest.mark.parametrize("name, penalty_at", list(PENALTY_VERDICTS))
def test_in_reward_k1_verdicts_by_when_the_penalty_is_computed(name, penalty_at):
  report = audit.audit(name, penalty_at=penalty_at, seeds=2)
  assert report.penalty_at == penalty_at and report.to_json()["penalty_at"] == penalty_at
  assert tuple(r.follows for r in report.settings) == PENALTY_VERDICTS[(name, penalty_at)], (
      report.markdown())


def test_elementwise_in_reward_matches_the_kljax_term_in_both_modes():
  # The user-facing elementwise form and the kljax term are the same code path per mode.
  for at in audit.PENALTY_AT:
    fn = audit.audit(kljax.k1, placement="reward", penalty_at=at, seeds=2)
    term = audit.audit("k1_in_reward", penalty_at=at, seeds=2)
    assert _follows(fn) == _follows(term)
    assert ("at rollout" in fn.markdown()) == (at == "rollout")


def _one_token_grad(impl, seed):
  policy, ref, old = gradient_table.policies(TOKEN_OFF, seed)
  g = audit.expected_gradient(impl, policy, ref, old=old,
                              space=gradient_table.space_of(TOKEN_OFF))
  return [np.asarray(t, np.float64) for t in (policy[0], ref[0], old[0])], np.asarray(g[0])


def _np_score_grad(logits, c):
  """∇_z Σ_y π(y) sg(c(y)) log π(y) = π ⊙ (c − E_π c) for a categorical π = softmax(z)."""
  p = np.exp(logits - logits.max())
  p /= p.sum()
  return p * (c - p @ c)


def _log_softmax(z):
  return z - z.max() - np.log(np.exp(z - z.max()).sum())


@pytest.mark.parametrize("seed", [0, 1])
def test_one_token_rollout_penalty_is_rkl_minus_kl_to_old(seed):
  # rollout: E_old[ρ·k1(π_old)·∇logπ] = ∇KL(π‖π_ref) − ∇KL(π‖π_old) (NumPy, from the definitions)
  (z, zr, zo), g = _one_token_grad(audit.from_term("k1_in_reward"), seed)
  lp, lq, lo = _log_softmax(z), _log_softmax(zr), _log_softmax(zo)
  rkl = _np_score_grad(z, lp - lq)  # ∇KL(π‖π_ref) = π ⊙ (k1 − E k1)
  kl_old = _np_score_grad(z, lp - lo)  # ∇KL(π‖π_old)
  np.testing.assert_allclose(g, rkl - kl_old, rtol=1e-4, atol=1e-6)
  assert np.linalg.norm(g - rkl) / np.linalg.norm(rkl) > 0.05  # visibly biased
  # current: exactly ∇KL(π‖π_ref)
  _, g_now = _one_token_grad(audit.from_term("k1_in_reward", penalty_at="current"), seed)
  np.testing.assert_allclose(g_now, rkl, rtol=1e-4, atol=1e-6)


def test_sequence_rollout_penalty_token_credit_by_kljax_exact():
  # Token credit, off-policy, rollout: Σ_t E_{y<t~π_old}[∇KL(π_t‖π_ref,t) − ∇KL(π_t‖π_old,t)] with
  # the prefix law frozen: frozen-prefix ∇RKL(π‖π_ref) − frozen-prefix ∇RKL(π‖π_old), prefixes π_old.
  policy, ref, old = gradient_table.policies(SEQ_OFF, 0)
  g = audit.expected_gradient(audit.from_term("k1_in_reward"), policy, ref, old=old,
                              space=gradient_table.space_of(SEQ_OFF))
  want = [a - b for a, b in zip(exact.frozen_prefix_rkl_grad(policy, ref, prefixes=old),
                                exact.frozen_prefix_rkl_grad(policy, old, prefixes=old))]
  np.testing.assert_allclose(gradient_table.flat(g), gradient_table.flat(want), rtol=1e-4,
                             atol=1e-6)


# ---- whole-sequence importance weights on a per-token k3 ----


def detached_sequence_ratio_k3(logp, ref_logp, old_logp, mask):
  # sg(W)·k3_t with W = Π_t π(y_t|y_<t)/π_old(y_t|y_<t), detached.
  w = sg(jnp.exp(jnp.sum(mask * (logp - old_logp), -1, keepdims=True)))
  return w * kljax.k3(logp, ref_logp)


def live_sequence_ratio_k3(logp, ref_logp, old_logp, mask):
  # W·k3_t with W = exp(Σ_t (logp_t − sg old_t)) live (the sum: TRL #5814's unbiased reading).
  w = jnp.exp(jnp.sum(mask * (logp - sg(old_logp)), -1, keepdims=True))
  return w * kljax.k3(logp, ref_logp)


def live_mean_ratio_k3(logp, ref_logp, old_logp, mask):
  # TRL importance_sampling_level="sequence": s·k3_t, s = exp(mean_t(logp_t − sg old_t)) live.
  n = jnp.maximum(jnp.sum(mask, -1, keepdims=True), 1.0)
  s = jnp.exp(jnp.sum(mask * (logp - sg(old_logp)), -1, keepdims=True) / n)
  return s * kljax.k3(logp, ref_logp)


def test_detached_sequence_ratio_k3_follows_the_on_policy_frozen_prefix_fkl():
  # E_old[sg(W)·Σ_t ∇k3_t] = E_π[Σ_t ∇k3_t] (W = P_θ(y)/P_old(y) turns the π_old expectation into
  # a π_θ one; detached, it adds no gradient): the on-policy per-token k3 gradient, i.e. each
  # position's ∇KL(π_ref‖π) with prefixes from π_θ. One token: ∇FKL (sg(ρ)·k3, the detached ratio).
  report = audit.audit(detached_sequence_ratio_k3, signature="sequence", seeds=2)
  assert _follows(report) == {
      TOKEN_ON.name: "∇FKL", TOKEN_OFF.name: "∇FKL", SEQ_ON.name: "frozen-prefix ∇FKL",
      SEQ_OFF.name: "frozen-prefix ∇FKL" + THETA, EOS_ON.name: "frozen-prefix ∇FKL"}, report.markdown()
  # and by kljax.exact: the frozen-prefix ∇FKL with the policy's own prefixes, to float32 precision
  policy, ref, old = gradient_table.policies(SEQ_OFF, 0)
  g = audit.expected_gradient(audit.sequence(detached_sequence_ratio_k3), policy, ref, old=old,
                              space=gradient_table.space_of(SEQ_OFF))
  np.testing.assert_allclose(gradient_table.flat(g),
                             gradient_table.flat(exact.frozen_prefix_fkl_grad(policy, ref)),
                             rtol=1e-4, atol=1e-6)


def test_live_sequence_ratio_k3_follows_the_sequence_rkl():
  # ∇(W·Σ_t k3_t) = W·(Σ_t ∇k3_t + (Σ_t k3_t)·∇log P_θ(y)); E_old[W·f] = E_θ[f], so the expected
  # gradient is E_θ[Σ_t ∇k3_t + (Σ_t k3_t)∇log P_θ] = ∇_θ E_θ[Σ_t k3_t] = ∇ of the sequence RKL
  # (k3 is unbiased for each position's RKL), on- and off-policy, with or without EOS.
  report = audit.audit(live_sequence_ratio_k3, signature="sequence", seeds=2)
  assert set(_follows(report).values()) == {"∇RKL"}, report.markdown()


def test_live_mean_ratio_k3_is_biased_for_sequences_only():
  # One token: s = ρ, c = (1 − δ) + k3 = −log δ: ∇RKL on- and off-policy. T > 1 on-policy: the
  # gradient is E[Σ_t (1 − δ_t)∇logπ_t] + E[(Σ_t k3_t)·(1/T)·∇log P(y)]: the frozen-prefix ∇FKL
  # plus 1/T of the score-function part of ∇ sequence-KL — the sum of neither target's parts.
  report = audit.audit(live_mean_ratio_k3, signature="sequence", seeds=2)
  f = _follows(report)
  assert f[TOKEN_ON.name] == f[TOKEN_OFF.name] == "∇RKL"
  assert f[SEQ_ON.name] == f[SEQ_OFF.name] == f[EOS_ON.name] == "biased", report.markdown()


# ---- --expect and assert_follows check every setting ----


def test_expect_fails_on_a_term_biased_only_for_sequences(tmp_path, monkeypatch, capsys):
  (tmp_path / "trlseq.py").write_text(
      "import jax, jax.numpy as jnp\n"
      "def k3_seq(logp, ref_logp, old_logp, mask):\n"
      "  n = jnp.maximum(jnp.sum(mask, -1, keepdims=True), 1.0)\n"
      "  s = jnp.exp(jnp.sum(mask * (logp - jax.lax.stop_gradient(old_logp)), -1,"
      " keepdims=True) / n)\n"
      "  ld = ref_logp - logp\n"
      "  return s * (jnp.exp(ld) - ld - 1)\n")
  monkeypatch.chdir(tmp_path)
  assert audit.main(["trlseq:k3_seq", "--expect", "reverse", "--seeds", "1"]) == 1
  out = capsys.readouterr().out
  assert "--expect reverse: NO (2 of 5 settings agree)" in out
  for s in (SEQ_ON, SEQ_OFF, EOS_ON):
    assert f"  {s.name}: the gradient biased" in out
  # the one-token settings alone agree
  assert audit.main(["trlseq:k3_seq", "--expect", "reverse", "--seeds", "1",
                     "--setting", "token-on", "--setting", TOKEN_OFF.name]) == 0
  assert audit.main(["trlseq:k3_seq", "--expect", "reverse", "--setting", "nope"]) == 2
  assert "setting must be one of" in capsys.readouterr().err


def test_assert_follows_names_every_disagreeing_setting():
  with pytest.raises(AssertionError) as e:
    audit.assert_follows(live_mean_ratio_k3, "reverse", signature="sequence", seeds=1)
  msg = str(e.value)
  assert "in 3 of 5 settings" in msg and SEQ_ON.name in msg and EOS_ON.name in msg
  audit.assert_follows(live_mean_ratio_k3, "reverse", signature="sequence", seeds=1,
                       setting=["token-on", "token-off"])
  # frozen_* expectations: the divergence itself for one token, the prefix law named off-policy
  audit.assert_follows(detached_sequence_ratio_k3, "frozen_forward", signature="sequence", seeds=1)
  with pytest.raises(AssertionError, match="prefixes from π_θ, not frozen-prefix ∇FKL, prefixes "
                                           "from π_old"):
    audit.assert_follows(detached_sequence_ratio_k3, "frozen_forward_old", signature="sequence",
                         seeds=1)
  audit.assert_follows("k3_as_loss+ratio", "frozen_reverse_old", seeds=1)
  # rollout penalty off-policy is biased; at the current parameters it follows
  with pytest.raises(AssertionError, match="one token, off-policy: the gradient biased"):
    audit.assert_follows("k1_in_reward", "frozen_reverse_old", seeds=1)
  audit.assert_follows("k1_in_reward", "frozen_reverse_old", seeds=1, penalty_at="current")


def test_penalty_at_errors_name_the_argument():
  with pytest.raises(ValueError, match="penalty_at must be one of rollout, current, got 'now'"):
    audit.audit("k1_in_reward", penalty_at="now")
  with pytest.raises(ValueError, match="penalty_at applies to in-reward penalties only"):
    audit.audit("k2_as_loss", penalty_at="current")
  with pytest.raises(ValueError, match="penalty_at applies to in-reward penalties only"):
    audit.elementwise(kljax.k1, placement="loss", penalty_at="rollout")
  with pytest.raises(ValueError, match="expected must be one of"):
    audit.assert_follows("k2_as_loss", "backward")
