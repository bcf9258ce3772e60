"""GRPO with the full-vocabulary KL terms (kljax.full_kl) through `kljax.train.grpo.train`: finite
metrics, the term's per-position KL logged, and the right direction wired (its value equals the
trainer's own exact-KL metric of the same policy on-policy)."""

import os
import sys

import numpy as np
import pytest

from kljax.train import grpo, loss, objective
from kljax.train.metrics import read_jsonl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_grpo import _init, tiny_config  # noqa: E402


def test_an_impossible_full_term_fails_before_compilation(data_dir):
  with pytest.raises(grpo.ConfigError, match="--config.kl.term: unknown KL term 'exact_fkl_rb'.*"
                                             "forward direction"):
    grpo.validate(tiny_config(data_dir, **{"kl.term": "exact_fkl_rb"}))


@pytest.mark.slow
@pytest.mark.parametrize("name,changes", [
    ("exact_rkl_as_loss", {}),
    ("exact_fkl_as_loss", {}),
    ("exact_rkl_rb", {}),
    ("top8_rkl_as_loss", {}),
    ("top8_rkl_rb", {}),
    ("exact_rkl_rb", {"loss.epochs": 2, "loss.minibatches": 2}),  # off-policy: cumulative ratio
])
def test_grpo_runs_with_full_terms(data_dir, sft_dir, tmp_path, name, changes):
  config = tiny_config(data_dir, **{"kl.term": name, "kl.beta": 0.1, "num_steps": 3,
                                    "optim.learning_rate": 3e-3, **changes})
  grpo.train(config, str(tmp_path), init_model=_init(sft_dir), progress=False)
  rows = read_jsonl(str(tmp_path / "metrics.jsonl"))
  assert [r["step"] for r in rows] == [0, 1, 2]
  for r in rows:
    assert all(np.isfinite(v) for v in r.values()), r
    assert r["kl_term_value"] >= -1e-6
  assert rows[0]["exact_rkl"] == pytest.approx(0.0, abs=1e-6)  # the rollout policy is π_ref
  if changes:  # off-policy: the step's later updates see a policy that has moved
    assert rows[0]["kl_term_value"] > 0
  else:
    assert rows[0]["kl_term_value"] == pytest.approx(0.0, abs=1e-6)
  assert rows[-1]["exact_rkl"] > 1e-5  # the policy moved: the comparisons below are not 0 = 0
  if not changes:  # on-policy: the update's KL_t is that of the rollout policy
    metric = "exact_fkl" if "fkl" in name else "exact_rkl"
    for r in rows[1:]:
      if name.startswith("exact"):
        assert r["kl_term_value"] == pytest.approx(r[metric], rel=1e-4, abs=1e-7)
      else:  # top-k + one tail draw a position: unbiased, noisy
        assert r["kl_term_value"] == pytest.approx(r[metric], rel=0.5)


def _np_log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


@pytest.mark.parametrize("on_policy", [True, False])
@pytest.mark.parametrize("name", ["exact_rkl_as_loss", "exact_fkl_as_loss", "exact_rkl_rb"])
def test_the_loss_adds_beta_times_the_terms_value(name, on_policy):
  """make_loss_fn with zero advantages: loss(β) − loss(0) = β · token-mean of the surrogate, here
  computed in NumPy float64 from the two models' logits (off-policy the Rao-Blackwellized term
  weighs position t by the cumulative ratio Π_{s<t} π_θ/π_old of the tokens before it)."""
  import jax
  from flax import nnx

  from kljax import models
  from kljax.kl import kl_term

  ref_model = models.create(models.preset("tiny"), seed=0)
  graphdef, ref_params = nnx.split(ref_model)
  leaves, tree = jax.tree.flatten(ref_params)
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  params = jax.tree.unflatten(tree, [x + 0.1 * jax.random.normal(k, x.shape, x.dtype)
                                     for x, k in zip(leaves, keys)])
  rng = np.random.default_rng(0)
  b, p, n = 3, 4, 5
  tokens = rng.integers(3, 64, (b, p + n)).astype(np.int32)
  mask = np.ones((b, n), bool)
  mask[0, 3:] = False
  mask[2, 1:] = False
  z = {}
  for key, prm in (("policy", params), ("ref", ref_params)):
    model = nnx.merge(graphdef, prm)
    h = np.asarray(model.hidden_states(tokens)[0], np.float64)[:, p - 1:-1]
    z[key] = _np_log_softmax(h @ np.asarray(model.unembedding(), np.float64))
  lp, lq = z["policy"], z["ref"]
  kl = ((np.exp(lq) * (lq - lp)).sum(-1) if "fkl" in name else (np.exp(lp) * (lp - lq)).sum(-1))
  logp = np.take_along_axis(lp, tokens[:, p:, None], -1)[..., 0]
  batch = {"tokens": tokens, "attn_mask": np.ones_like(tokens, bool), "mask": mask,
           "advantages": np.zeros((b, n), np.float32)}
  weight = np.ones((b, n))
  if not on_policy:
    delta = rng.normal(0, 0.3, (b, n))
    batch |= {"old_logp": (logp - delta).astype(np.float32),
              "ref_logp": np.take_along_axis(lq, tokens[:, p:, None], -1)[..., 0].astype(
                  np.float32)}
    if name == "exact_rkl_rb":
      d = np.where(mask, delta, 0.0)
      weight = np.exp(np.cumsum(d, -1) - d)
  want = (weight * kl * mask).sum() / mask.sum()
  kl_objective = objective.of(kl_term(name), on_policy=on_policy)
  loss_fn = loss.make_loss_fn(kl_objective, graphdef=graphdef, prompt_len=p, clip_eps_low=0.2,
                              clip_eps_high=0.2, dual_clip=None, aggregation="token-mean",
                              chunk_size=4, exact_kl=False, on_policy=on_policy, with_ref=True)
  loss1, aux = loss_fn(params, ref_params, 1.0, batch)
  loss0, _ = loss_fn(params, ref_params, 0.0, batch)
  assert float(loss1 - loss0) == pytest.approx(want, rel=1e-4)
  assert float(aux["kl_term_value"]) == pytest.approx((kl * mask).sum() / mask.sum(), rel=1e-4)
