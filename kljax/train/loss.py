"""The jitted pieces of a GRPO step: the reference pass, the per-token statistics of a rollout,
the minibatch loss (`make_loss_fn`: PPO-clip plus the KL term through its `objective`), and one
optimizer update. Built once from explicit options: no traced function reads the config or picks
a branch by a string inside the trace.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from kljax import logprobs, losses
from kljax.train.objective import KLObjective, LossInputs


def _completion_positions(tokens, prompt_len: int):
  """The positions whose hidden states predict the completion, and the completion tokens."""
  return slice(prompt_len - 1, tokens.shape[1] - 1), tokens[:, prompt_len:]


class Reference(NamedTuple):
  """The reference's view of the completion, under stop_gradient: nothing flows into π_ref."""
  hidden_btd: jax.Array  # at the positions that predict the completion
  unembed_dv: jax.Array
  logp_bt: jax.Array  # log π_ref(y_t)


def reference_pass(graphdef, ref_params, tokens, attn_mask, *, prompt_len: int,
                   chunk_size: int) -> Reference:
  """The reference model's forward pass over the completion tokens."""
  sl, targets = _completion_positions(tokens, prompt_len)
  ref = nnx.merge(graphdef, ref_params)
  rh, _ = ref.hidden_states(tokens, attention_mask_bt=attn_mask)
  rh, rw = jax.lax.stop_gradient(rh[:, sl]), jax.lax.stop_gradient(ref.unembedding())
  return Reference(rh, rw, logprobs.token_stats(rh, rw, targets, chunk_size=chunk_size).logp)


def completion_stats(graphdef, params, ref_params, tokens, attn_mask, *, prompt_len: int,
                     chunk_size: int, with_ref: bool, exact_kl: bool = True) -> dict:
  """Per completion token: policy log-prob, entropy, and (with a reference) its log-prob and the
  exact reverse/forward KL. Arrays [B, N]."""
  policy = nnx.merge(graphdef, params)
  h, _ = policy.hidden_states(tokens, attention_mask_bt=attn_mask)
  sl, targets = _completion_positions(tokens, prompt_len)
  if not with_ref:
    s = logprobs.token_stats(h[:, sl], policy.unembedding(), targets, chunk_size=chunk_size)
    return {"logp": s.logp, "entropy": s.entropy}
  ref = reference_pass(graphdef, ref_params, tokens, attn_mask, prompt_len=prompt_len,
                       chunk_size=chunk_size)
  s = logprobs.token_stats(h[:, sl], policy.unembedding(), targets,
                           ref_hidden_btd=ref.hidden_btd if exact_kl else None,
                           ref_unembed_dv=ref.unembed_dv if exact_kl else None,
                           chunk_size=chunk_size)
  out = {"logp": s.logp, "entropy": s.entropy, "ref_logp": ref.logp_bt}
  if exact_kl:
    out |= {"rkl": s.reverse_kl, "fkl": s.forward_kl}
  return out


def _policy_pass(graphdef, params, tokens, attn, sl, targets, *, ref: Reference | None,
                 chunk_size: int):
  """The policy's completion hidden states [B, N, D], its unembedding [D, V] and `token_stats`
  (with the exact KL columns against `ref` when given)."""
  policy = nnx.merge(graphdef, params)
  h = policy.hidden_states(tokens, attention_mask_bt=attn)[0][:, sl]
  unembed = policy.unembedding()
  s = logprobs.token_stats(h, unembed, targets,
                           ref_hidden_btd=None if ref is None else ref.hidden_btd,
                           ref_unembed_dv=None if ref is None else ref.unembed_dv,
                           chunk_size=chunk_size)
  return h, unembed, s


def _token_aux(s: logprobs.TokenStats, ref_logp, exact: bool) -> dict:
  """The per-token statistics an on-policy loss returns for the metrics (no gradient)."""
  tok = {"logp": s.logp, "entropy": s.entropy}
  if ref_logp is not None:
    tok["ref_logp"] = ref_logp
  if exact:
    tok |= {"rkl": s.reverse_kl, "fkl": s.forward_kl}
  return jax.lax.stop_gradient(tok)


def make_loss_fn(kl: KLObjective, *, graphdef, prompt_len: int, clip_eps_low: float,
                 clip_eps_high: float, dual_clip: float | None, aggregation: str,
                 chunk_size: int, exact_kl: bool, on_policy: bool, with_ref: bool,
                 correction=None, correct_kl: bool = True):
  """The minibatch loss `loss_fn(params, ref_params, beta, batch) -> (loss, aux)`:

    loss = agg(w · PPO-clip(logp, old_logp, A')) + β · agg(w · KL loss)

  with A' the batch's advantages as the KL objective `kl` shapes them in the loss (an after-norm
  in-reward term on-policy or at reward_at="current") and the KL loss what `kl.loss` contributes
  (a term placed in the loss, or one over the full distribution; nothing for the others); `agg`
  is `aggregation` over the completion mask. Off-policy batches carry `old_logp` and `ref_logp`
  from the statistics pass. On-policy (`on_policy`) batches carry neither: the loss runs the
  reference pass itself, takes old_logp = sg(logp) from its own forward pass (ρ ≡ 1, the same
  gradient) — one policy forward per iteration instead of two — and returns the per-token
  statistics for the metrics in aux["tokens"]. A term that needs the reference's hidden states
  (`kl.reference_states`) has the reference pass run in the loss off-policy too.

  `correction` (a `kljax.offpolicy` weights fn; the batch then carries `sampler_logp`, log μ):
  w = the detached weight w(π_old/μ) of every per-token loss, the PPO-clip one and (with
  `correct_kl`) the KL term's, for rollouts sampled by μ ≠ π_old; w = 1 without one."""
  ref_in_loss = (on_policy and with_ref) or kl.reference_states
  dual_clip = dual_clip or None

  def loss_fn(params, ref_params, beta, batch):
    tokens, attn, mask = batch["tokens"], batch["attn_mask"], batch["mask"]
    sl, targets = _completion_positions(tokens, prompt_len)
    ref, ref_logp = None, batch.get("ref_logp")
    if ref_in_loss:
      ref = reference_pass(graphdef, ref_params, tokens, attn, prompt_len=prompt_len,
                           chunk_size=chunk_size)
      ref_logp = ref.logp_bt
    # the full-vocabulary KL columns only when logged or when the KL term reads them
    exact = ref is not None and (exact_kl or kl.exact_columns)
    h, unembed, s = _policy_pass(graphdef, params, tokens, attn, sl, targets,
                                 ref=ref if exact else None, chunk_size=chunk_size)
    logp = s.logp
    old = jax.lax.stop_gradient(logp) if on_policy else batch["old_logp"]
    advantages = kl.loss_advantages(batch["advantages"], beta, logp, old, ref_logp, mask)
    pg = losses.ppo_clip_loss(logp, old, advantages, mask, clip_eps_low=clip_eps_low,
                              clip_eps_high=clip_eps_high, dual_clip=dual_clip)
    agg = functools.partial(losses.aggregate, mask_bt=mask, mode=aggregation)
    w = 1.0 if correction is None else correction(old, batch["sampler_logp"], mask).weights_bt
    loss = agg(w * pg.loss_bt)
    n = jnp.maximum(jnp.sum(mask), 1)
    aux = {"clip_fraction": jnp.sum(pg.clipped_bt) / n, "ppo_kl": jnp.sum(pg.ppo_kl_bt) / n}
    kl_loss_bt, kl_aux = kl.loss(LossInputs(s, h, unembed, ref, ref_logp, old, mask, batch,
                                            chunk_size))
    if kl_loss_bt is not None:
      loss = loss + beta * agg((w if correct_kl else 1.0) * kl_loss_bt)
      aux |= kl_aux
    if on_policy:
      aux["tokens"] = _token_aux(s, ref_logp if with_ref else None, exact)
    return loss, aux

  return loss_fn


def _norm(tree) -> jax.Array:
  return optax.tree.norm(tree)


def update(loss_fn, optimizer: optax.GradientTransformation, params, opt_state, beta, batch,
           ref_params=None):
  """One optimizer step of `loss_fn` (from `make_loss_fn`) on a minibatch; aux gains the loss
  and the l2 norms of the gradient, the update and the new parameters."""
  (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, ref_params, beta, batch)
  updates, opt_state = optimizer.update(grads, opt_state, params)
  params = optax.apply_updates(params, updates)
  aux.update(loss=loss, grad_norm=_norm(grads), update_norm=_norm(updates),
             param_norm=_norm(params))
  return params, opt_state, aux

