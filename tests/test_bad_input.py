"""Bad input gets a clear error naming the argument, the value seen and what was expected."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kljax
from kljax import exact

F = jnp.zeros((2, 3))


def test_mismatched_shapes():
  with pytest.raises(ValueError, match=r"logp\[2, 3\].*ref_logp\[3, 2\]"):
    kljax.k1(F, jnp.zeros((3, 2)))
  with pytest.raises(ValueError, match=r"old_logp\[2\]"):
    kljax.kl_term("k2_as_loss+ratio").surrogate(F, F, jnp.zeros((2,)))
  with pytest.raises(ValueError, match=r"mask\[3\]"):
    kljax.kl_term("k1_in_reward").surrogate(F, F, mask=jnp.ones((3,), bool))
  with pytest.raises(ValueError, match=r"logits\[2, 3\].*ref_logits\[2, 4\]"):
    kljax.exact_kl(F, jnp.zeros((2, 4)))
  with pytest.raises(ValueError, match=r"mask must have shape logits.shape\[:-1\] = \[2\], got \[3\]"):
    kljax.exact_kl(F, F, mask=jnp.ones((3,), bool))
  with pytest.raises(ValueError, match=r"values_bt\[2, 3\].*mask_bt\[2, 2\]"):
    kljax.reward_to_go(F, jnp.ones((2, 2)))


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_])
def test_integer_and_bool_dtypes(dtype):
  bad = jnp.zeros((2, 3), dtype)
  with pytest.raises(TypeError, match=f"logp must be a floating-point array.*{jnp.dtype(dtype).name}"):
    kljax.k3(bad, F)
  with pytest.raises(TypeError, match="ref_logp must be a floating-point array"):
    kljax.kl_term("k2_as_loss").surrogate(F, bad)
  with pytest.raises(TypeError, match="logits must be a floating-point array"):
    kljax.exact_kl(bad, F)


def test_errors_are_raised_at_trace_time_under_jit():
  with pytest.raises(ValueError, match="expected arrays of one shape"):
    jax.jit(kljax.k2)(F, jnp.zeros((3, 2)))


def test_unknown_names_and_options():
  with pytest.raises(ValueError, match="unknown KL term 'k5_as_loss'.*Valid names"):
    kljax.kl_term("k5_as_loss")
  with pytest.raises(TypeError, match="name must be a string"):
    kljax.kl_term(3)
  with pytest.raises(ValueError, match="correction must be None or one of detached_ratio, ratio, clipped; got 'is'"):
    kljax.as_loss(kljax.k2, correction="is")
  with pytest.raises(ValueError, match="credit must be one of token, reward_to_go; got 'seq'"):
    kljax.in_reward(kljax.k1, credit="seq")
  with pytest.raises(ValueError, match="direction must be 'reverse' or 'forward', got 'both'"):
    kljax.exact_kl(F, F, direction="both")
  with pytest.raises(ValueError, match="level must be 'token' or 'sequence', got 'word'"):
    p = exact.categorical(jnp.zeros(3))
    exact.expected_gradient(kljax.kl_term("k2_as_loss"), p, p, level="word")


@pytest.mark.parametrize("value", [-0.1, float("nan"), float("inf")])
def test_negative_or_non_finite_beta(value):
  with pytest.raises(ValueError, match=rf"beta must be a finite number >= 0, got {value!r}"):
    kljax.constant_beta(value)
  with pytest.raises(ValueError, match=r"beta \(the schedule's value at step 0\)"):
    kljax.scheduled_beta(lambda step: value + 0 * step)
  with pytest.raises(ValueError, match="init_beta must be a finite number > 0"):
    kljax.adaptive_beta(value, target_kl=0.1, horizon=100)
  with pytest.raises(ValueError, match="beta must be a finite number > 0"):
    exact.optimum_reverse([0.5, 0.5], [0.0, 1.0], value)
  with pytest.raises(TypeError, match="beta must be a number, an optax schedule or a BetaController"):
    kljax.beta_controller("0.1")


def test_adaptive_beta_arguments():
  with pytest.raises(ValueError, match="target_kl must be a finite number > 0, got 0"):
    kljax.adaptive_beta(0.1, target_kl=0, horizon=100)
  with pytest.raises(ValueError, match="horizon must be a finite number > 0, got -5"):
    kljax.adaptive_beta(0.1, target_kl=0.1, horizon=-5)


@pytest.mark.parametrize("eps", [0.0, 1.0, -0.2, 1.5])
def test_clip_epsilon_outside_unit_interval(eps):
  with pytest.raises(ValueError, match=rf"clip_eps_low must lie in the open interval \(0, 1\), got {eps!r}"):
    kljax.kl_term("k2_as_loss+clipped", clip_eps_low=eps)
  with pytest.raises(ValueError, match=rf"clip_eps_high must lie in the open interval \(0, 1\), got {eps!r}"):
    kljax.as_loss(kljax.k2, correction="clipped", clip_eps_high=eps)


def test_clamp_must_be_positive():
  with pytest.raises(ValueError, match="clamp must be a finite number > 0, got 0"):
    kljax.kl_term("k3_as_loss", clamp=0)


@pytest.mark.parametrize(
    "probs,match",
    [
        ([0.5, 0.6], "must sum to 1 over its last axis.*1.1"),
        ([1.2, -0.2], "must be non-negative and finite"),
        ([0.5, float("nan"), 0.5], "must be non-negative and finite"),
    ],
)
def test_non_normalized_distributions_to_the_oracle(probs, match):
  with pytest.raises(ValueError, match="ref_probs " + match):
    exact.optimum_reverse(probs, np.zeros(len(probs)), 0.1)
  with pytest.raises(ValueError, match="ref_probs " + match):
    exact.optimum_forward(probs, np.zeros(len(probs)), 0.1)
  with pytest.raises(ValueError, match="probs " + match):
    exact.categorical_from_probs(probs)
  with pytest.raises(ValueError, match="p " + match):
    exact.tv_distance(probs, np.full(len(probs), 1 / len(probs)))
  with pytest.raises(ValueError, match="ref_probs " + match):
    exact.categorical_rkl_grad(jnp.zeros(len(probs)), probs)


def test_malformed_tabular_policies():
  good = exact.random_tabular(jax.random.PRNGKey(0), vocab=3, length=2)
  with pytest.raises(ValueError, match=r"policy\[1\] must have shape \[3, 3\].*got \[3, 4\]"):
    exact.token_logprobs((good[0], jnp.zeros((3, 4))))
  with pytest.raises(ValueError, match=r"ref has \(vocab, length\) \(3, 1\), expected \(3, 2\)"):
    exact.expected_gradient(kljax.kl_term("k2_as_loss"), good, good[:1])
  with pytest.raises(TypeError, match="policy must be a non-empty tuple of logit tables"):
    exact.token_logprobs(jnp.zeros(3))
  with pytest.raises(ValueError, match="need vocab >= 2 and length >= 1, got vocab=1"):
    exact.random_tabular(jax.random.PRNGKey(0), vocab=1, length=2)
