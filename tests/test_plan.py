"""experiments.plan on a small preset (8 simulated devices), and the activation sharding it found."""

import argparse

import jax
import numpy as np
import pytest
from flax import nnx

from experiments import plan as plan_lib
from kljax import models, sharding


def _args(**kw):
  args = plan_lib._parser().parse_args(["--preset", "tiny", "--devices", "8", "--fsdp", "8",
                                        "--prompt_len", "8", "--new_tokens", "8"])
  return argparse.Namespace(**(vars(args) | kw))


@pytest.fixture(scope="module")
def tiny_plan():
  return plan_lib.plan(_args())


def test_plan_reports_per_device_bytes_from_the_shardings(tiny_plan):
  p = tiny_plan
  assert set(p["per_device_bytes"]) >= {"params", "optimizer", "reference", "gradients",
                                        "kv_cache", "temp", "total"}
  cfg = models.preset("tiny")
  model = models.create(cfg)
  total_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(model)))
  assert p["param_count"] == models.count_params(model)
  # FSDP over 8 devices: each holds ≈ 1/8 of the weights (small replicated norms aside).
  assert total_bytes / 8 <= p["per_device_bytes"]["params"] < total_bytes / 8 * 1.2
  # Adam: two moments per weight, sharded like the weights (plus scalar counters).
  assert abs(p["per_device_bytes"]["optimizer"] - 2 * p["per_device_bytes"]["params"]) < 1024
  # KV cache: 2 (k, v) × layers × 2 sequences a device × 16 slots × kv heads × head dim × bf16.
  assert p["per_device_bytes"]["kv_cache"] == (2 * cfg.num_layers * 2 * 16 * cfg.num_kv_heads
                                               * cfg.head_dim * 2)
  assert p["flops_per_step"] > 0 and p["per_device_bytes"]["total"] > 0
  assert "qwen" not in plan_lib.render(p) and "fits: TPU v5e" in plan_lib.render(p)


def test_activations_keep_their_batch_sharding_under_a_mesh():
  mesh = sharding.make_mesh(data=1, fsdp=8, tensor=1)
  model = models.create(models.preset("tiny"))
  sharding.shard_module(model, mesh)
  graphdef, state = nnx.split(model)
  tokens = jax.device_put(np.zeros((8, 6), np.int32), sharding.batch_sharding(mesh))

  def hidden(state, tokens):
    return nnx.merge(graphdef, state).hidden_states(tokens)[0]

  with jax.set_mesh(mesh):
    out = jax.jit(hidden)(state, tokens)
  assert out.sharding.spec[0] == "fsdp", out.sharding
  # Without a mesh the constraint is a no-op: one device, nothing to constrain.
  x = np.ones((4, 3), np.float32)
  assert sharding.constrain_batch(x) is x


def test_docs_scale_table_is_the_committed_plan_table():
  import os

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  with open(os.path.join(root, "docs", "scale.md")) as f:
    page = f.read()
  block = page.split("<!-- BEGIN plan:table -->\n")[1].split("<!-- END plan:table -->\n")[0]
  with open(os.path.join(root, "experiments", "results", "plan", "table.md")) as f:
    assert block == f.read(), ("docs/scale.md's table differs from experiments/results/plan/"
                               "table.md: run python -m experiments.readme")
