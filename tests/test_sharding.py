"""Sharded execution on 8 simulated CPU devices equals single-device execution."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from kljax import models, sharding
from kljax.sampling import sample

CFG = models.preset("tiny").replace(vocab_size=128, num_kv_heads=4)  # every dim divides the meshes


def test_eight_devices_are_simulated():
  assert jax.device_count() == 8


def _loss(model, tokens, mask):
  logits = model(tokens, attention_mask_bt=mask)
  logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
  picked = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
  return -jnp.sum(picked * mask[:, 1:]) / jnp.sum(mask[:, 1:])


@pytest.fixture(scope="module")
def batch():
  tokens = jax.random.randint(jax.random.PRNGKey(0), (8, 12), 1, CFG.vocab_size)
  mask = jnp.arange(12)[None, :] >= jnp.array([0, 3, 0, 5, 1, 0, 2, 0])[:, None]
  return jnp.where(mask, tokens, 0), mask


@pytest.mark.parametrize("shape", [(2, 2, 2), (1, 2, 4), (8, 1, 1), (1, 8, 1)])
def test_sharded_forward_and_backward_equal_single_device(batch, shape):
  tokens, mask = batch
  single = models.create(CFG, seed=1)
  ref_loss, ref_grads = nnx.value_and_grad(_loss)(single, tokens, mask)

  mesh = sharding.make_mesh(data=shape[0], fsdp=shape[1], tensor=shape[2])
  model = sharding.shard_module(models.create(CFG, seed=1), mesh)
  placed = jax.device_put((tokens, mask), sharding.batch_sharding(mesh))
  loss, grads = nnx.jit(nnx.value_and_grad(_loss))(model, *placed)
  assert float(loss) == pytest.approx(float(ref_loss), rel=1e-5)
  for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(grads)),
                               nnx.to_flat_state(nnx.state(ref_grads))):
    a, b = np.asarray(a[...]), np.asarray(b[...])
    assert np.abs(a - b).max() <= 1e-5 * max(np.abs(b).max(), 1e-3), path


def test_parameters_are_really_partitioned():
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  model = sharding.shard_module(models.create(CFG), mesh)
  assert model.wq[...].sharding.spec == P(None, "fsdp", "tensor", None)
  assert model.w_down[...].sharding.spec == P(None, "tensor", "fsdp")
  # vocab claims fsdp before embed does (the rules' order): the logits stay split over the vocabulary
  assert model.embed[...].sharding.spec == P(("tensor", "fsdp"), None)


def test_per_device_parameter_bytes_are_an_eighth():
  mesh = sharding.make_mesh(data=1, fsdp=2, tensor=4)
  model = sharding.shard_module(models.create(CFG), mesh)
  state = nnx.state(model)
  total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
  per_device = sharding.bytes_per_device(state)
  assert len(per_device) == 8
  for b in per_device.values():
    assert total / 8 <= b <= 1.05 * total / 8  # only the small norm vectors are replicated


def test_indivisible_dimensions_are_replicated():
  mesh = sharding.make_mesh(data=1, fsdp=2, tensor=4)
  # 2 KV heads cannot be split 4 ways: that dimension stays whole, the embedding still splits.
  spec = sharding.logical_to_spec(("layers", "embed", "kv_heads", "head_dim"), (2, 64, 2, 16), mesh)
  assert spec == P(None, "fsdp", None, None)
  with pytest.raises(ValueError, match="logical axis 'rows' has no sharding rule"):
    sharding.logical_to_spec(("rows",), (4,), mesh)


def test_mesh_errors_before_compilation():
  with pytest.raises(ValueError, match=r"mesh data×fsdp×tensor = 2×2×3 = 12 does not match the 8"):
    sharding.make_mesh(data=2, fsdp=2, tensor=3)
  with pytest.raises(ValueError, match="not divisible by the fixed axes' product 3"):
    sharding.make_mesh(data=-1, tensor=3)
  assert sharding.make_mesh(data=-1, tensor=2).shape == {"data": 4, "fsdp": 1, "tensor": 2}
  mesh = sharding.make_mesh(data=4, fsdp=2)
  with pytest.raises(ValueError, match="batch size 12 must be divisible by the data×fsdp mesh size 8"):
    sharding.check_divisible(12, mesh)


@pytest.mark.parametrize("axes", [dict(data=8), dict(data=2, fsdp=4)])
def test_sampler_runs_sharded(axes):
  """Replicated weights (data) decode on per-layer slices; weights split over fsdp keep the scan
  over the stacked layers (one layer gathered at a time): both give the one-device tokens."""
  model = models.create(CFG, seed=2)
  prompts = jax.random.randint(jax.random.PRNGKey(3), (8, 5), 1, CFG.vocab_size)
  mask = jnp.ones_like(prompts, bool)
  ref = sample(model, prompts, mask, jax.random.PRNGKey(4), max_new_tokens=6, eos_id=0,
               temperature=0.0)
  mesh = sharding.make_mesh(**axes)
  sharded_model = sharding.shard_module(models.create(CFG, seed=2), mesh)
  split = not all(x.sharding.is_fully_replicated for x in jax.tree.leaves(nnx.state(sharded_model)))
  assert split == ("fsdp" in axes)
  placed = jax.device_put((prompts, mask), sharding.batch_sharding(mesh))
  out = sample(sharded_model, *placed, jax.random.PRNGKey(4), max_new_tokens=6, eos_id=0,
               temperature=0.0)
  np.testing.assert_array_equal(out.tokens_bt, ref.tokens_bt)
  assert len(out.tokens_bt.sharding.device_set) == 8


# 60-wide embeddings and a 100-token vocabulary: neither divides an fsdp axis of 8.
ODD = models.preset("tiny").replace(d_model=60, vocab_size=100)


def test_the_vocabulary_split_follows_the_update_size():
  # A [V, D] embedding on fsdp=8: small updates (tokens · 8 <= V) put fsdp on the vocabulary rows,
  # large ones on the embedding dimension (ZeRO-3); both divide, so the rules alone decide.
  mesh = sharding.make_mesh(data=1, fsdp=8, tensor=1)
  small = sharding.rules_for(tokens_per_update=1_000, vocab_size=152_064)
  large = sharding.rules_for(tokens_per_update=393_216, vocab_size=152_064)
  assert small == sharding.DEFAULT_RULES and large == sharding.EMBED_FIRST_RULES
  assert sharding.rules_for(19_008, 152_064) == sharding.DEFAULT_RULES  # 19,008·8 = 152,064
  assert sharding.rules_for(19_009, 152_064) == sharding.EMBED_FIRST_RULES
  assert sharding.logical_to_spec(("vocab", "embed"), (1024, 64), mesh, small) == P("fsdp", None)
  assert sharding.logical_to_spec(("vocab", "embed"), (1024, 64), mesh, large) == P(None, "fsdp")
  with pytest.raises(ValueError, match="tokens_per_update and vocab_size must be >= 1"):
    sharding.rules_for(0, 100)
  # An explicit split overrides the size rule either way.
  assert sharding.rules_for(393_216, 152_064, "vocab") == sharding.DEFAULT_RULES
  assert sharding.rules_for(1_000, 152_064, "embed") == sharding.EMBED_FIRST_RULES
  with pytest.raises(ValueError, match="embedding split must be one of auto, vocab, embed, got 'rows'"):
    sharding.rules_for(1_000, 152_064, "rows")


def test_the_trainer_reads_its_embedding_split_from_the_config():
  from kljax.train import grpo
  from kljax.train.config import grpo_tiny
  from kljax.train.options import Options

  c = grpo_tiny()  # 64 completions × (8 + 4) tokens = 768 tokens an update
  c.mesh.devices = 1
  assert grpo.param_rules(Options.of(c), vocab_size=768 * 8) == sharding.DEFAULT_RULES
  assert grpo.param_rules(Options.of(c), vocab_size=768 * 8 - 1) == sharding.EMBED_FIRST_RULES
  c.loss.minibatches = 2  # an update is one minibatch: 384 tokens
  assert grpo.param_rules(Options.of(c), vocab_size=384 * 8) == sharding.DEFAULT_RULES
  c.mesh.embedding_split = "embed"
  assert grpo.param_rules(Options.of(c), vocab_size=384 * 8) == sharding.EMBED_FIRST_RULES
  c.mesh.embedding_split = "rows"
  with pytest.raises(grpo.ConfigError, match="mesh.embedding_split"):
    grpo.validate(c)


def test_storage_axis_falls_back_to_a_dimension_it_divides():
  mesh = sharding.make_mesh(data=1, fsdp=8, tensor=1)
  # embed 60 is not a multiple of 8: fsdp moves to the largest dimension it divides.
  assert sharding.logical_to_spec(("layers", "embed", "mlp"), (2, 60, 128), mesh) == P(
      None, None, "fsdp")
  assert sharding.logical_to_spec(("layers", "embed", "heads", "head_dim"), (2, 60, 4, 16),
                                  mesh) == P(None, None, None, "fsdp")
  # never the scanned layer axis, even when it divides; nothing divides: replicated.
  assert sharding.logical_to_spec(("layers", "embed", "heads"), (8, 60, 3), mesh) == P(
      None, None, None)
  # with tensor: the fallback dimension must divide by both axes' product (128 = 4·2·16).
  mesh = sharding.make_mesh(data=1, fsdp=2, tensor=4)
  assert sharding.logical_to_spec(("layers", "embed", "mlp"), (2, 5, 128), mesh) == P(
      None, None, ("tensor", "fsdp"))
  # a compute axis does not move (tensor still replicates 2 KV heads; fsdp keeps embed).
  assert sharding.logical_to_spec(("layers", "embed", "kv_heads", "head_dim"), (2, 64, 2, 16),
                                  mesh) == P(None, "fsdp", None, None)


def test_indivisible_model_is_an_eighth_per_device_and_computes_alike(batch, tmp_path):
  from kljax.models import hf

  hf.export_hf(models.create(ODD, seed=3), tmp_path)
  single = hf.from_hf(tmp_path)
  padded = hf.from_hf(tmp_path, vocab_multiple=8)  # 100 -> 104 rows: 8 divides them
  assert padded.embed[...].shape == (104, 60) and single.embed[...].shape == (100, 60)
  mesh = sharding.make_mesh(data=1, fsdp=8, tensor=1)
  padded = sharding.shard_module(padded, mesh)
  state = nnx.state(padded)
  # Expected from the shapes alone: everything splits 8 ways except the norm vectors.
  norms = sum(int(np.prod(getattr(padded, n)[...].shape)) * 4
              for n in ("attn_norm", "mlp_norm", "final_norm"))
  total = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(state))
  per_device = sharding.bytes_per_device(state)
  assert len(per_device) == 8
  assert set(per_device.values()) == {(total - norms) // 8 + norms}

  tokens, mask = batch
  tokens = tokens % ODD.vocab_size
  ref_loss, ref_grads = nnx.value_and_grad(_loss)(single, tokens, mask)
  placed = jax.device_put((tokens, mask), sharding.batch_sharding(mesh))
  loss, grads = nnx.jit(nnx.value_and_grad(_loss))(padded, *placed)
  assert float(loss) == pytest.approx(float(ref_loss), rel=1e-5)
  g, ref_g = np.asarray(grads.embed[...]), np.asarray(ref_grads.embed[...])
  np.testing.assert_allclose(g[:100], ref_g, atol=1e-5 * np.abs(ref_g).max())
  assert not g[100:].any()  # the padded rows are never read
  # and the HF files written from the padded model are the unpadded ones
  hf.export_hf(padded, tmp_path / "again")
  np.testing.assert_array_equal(np.asarray(hf.from_hf(tmp_path / "again").embed[...]),
                                np.asarray(single.embed[...]))
