"""The update donates the train state: the donated buffers are really gone, everything that must
outlive an update (the reference, the caller's model, the sampler's stale parameters) holds arrays
of its own, and a checkpoint saved right before a donating update (written in the background,
waited for before the update) restores bit-identical."""

import jax
import numpy as np
import pytest
from flax import nnx

from kljax import models
from kljax.train import grpo
from kljax.train.checkpoint import Checkpointer
from test_grpo import tiny_config


def _host(tree):
  return [np.array(x) for x in jax.tree.leaves(tree)]


def _nbytes(tree) -> int:
  return sum(x.nbytes for x in jax.tree.leaves(tree))


@pytest.fixture(scope="module")
def run(data_dir):
  """A tiny setup built from a caller's model, its compiled functions, and the state before and
  after one step (both staleness 1 and a reference reset every step, the two queues that keep
  parameters across an update)."""
  model = models.create(models.preset("tiny", vocab_size=83), seed=0)
  c = tiny_config(data_dir, **{"rollout.staleness": 1, "kl.reset_ref_every": 1})
  setup, state = grpo.build(c, init_model=model)
  fns = grpo.compile_fns(setup)
  before = _host(state)
  with jax.set_mesh(setup.mesh):
    after, _ = grpo.train_step(setup, state, fns)
  return model, setup, fns, state, before, after


def test_the_update_donates_params_and_optimizer_state(run):
  model, setup, fns, state, _, after = run
  assert all(x.is_deleted() for x in jax.tree.leaves(state.params))
  assert all(x.is_deleted() for x in jax.tree.leaves(state.opt_state) if x.size > 1)
  # what must outlive the update still reads
  for tree in (state.ref_params, nnx.state(model), after.params, after.ref_params,
               after.stale_params, after.opt_state):
    assert not any(x.is_deleted() for x in jax.tree.leaves(tree))
  # XLA aliases the donated inputs to the outputs: no second train state at the update's peak
  batch = {"tokens": np.zeros((16, 11), np.int32), "attn_mask": np.ones((16, 11), bool),
           "mask": np.ones((16, 3), bool), "advantages": np.zeros((16, 3), np.float32)}
  with jax.set_mesh(setup.mesh):
    mem = fns["update"].lower(after.params, after.opt_state, after.beta.beta, batch,
                              after.ref_params).compile().memory_analysis()
  assert mem.alias_size_in_bytes >= _nbytes(after.params) + _nbytes(after.opt_state) - 64


def test_the_queues_hold_the_parameters_they_had_before_the_update(run):
  _, _, _, state, before, after = run
  n = len(jax.tree.leaves(state.params))
  theta0 = before[:n]  # TrainState's first field: the policy before the step
  # staleness 1: the sampler's next parameters are the step's starting ones, θ_0
  for got, want in zip(_host(after.stale_params[0]), theta0):
    np.testing.assert_array_equal(got, want)
  # the reset reference equals the new policy, in buffers of its own
  for a, b in zip(jax.tree.leaves(after.ref_params), jax.tree.leaves(after.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert a.unsafe_buffer_pointer() != b.unsafe_buffer_pointer()
  pointers = lambda tree: {x.unsafe_buffer_pointer() for x in jax.tree.leaves(tree)}  # noqa: E731
  assert not pointers(after.stale_params) & pointers(after.params)


def test_a_checkpoint_saved_right_before_a_donating_update_restores_bit_identical(run, tmp_path,
                                                                                   monkeypatch):
  import asyncio

  from kljax.train import checkpoint

  write = checkpoint.DigestHandler._write

  async def late(self, directory, args):  # the digest lags behind the next rollout
    await asyncio.sleep(1.0)
    await write(self, directory, args)

  monkeypatch.setattr(checkpoint.DigestHandler, "_write", late)
  _, setup, fns, _, _, after = run
  saved = _host(after)
  ckpt = Checkpointer(str(tmp_path), every=1)
  ckpt.maybe_save(1, after)  # asynchronous: still writing while the next rollout runs
  with jax.set_mesh(setup.mesh):  # the trainer's protocol: wait for the save, then donate
    later, _ = grpo.train_step(setup, after, fns, before_update=ckpt.wait)
    later, _ = grpo.train_step(setup, later, fns, before_update=ckpt.wait)
  assert all(x.is_deleted() for x in jax.tree.leaves(after.params))
  ckpt.wait()
  restored = ckpt.restore(later)  # verifies the digest written in the background
  ckpt.close()
  assert restored.step == 1 and not restored.rejected
  for got, want in zip(_host(restored.state), saved):
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)


def test_later_steps_compile_nothing_new(run):
  """The update's outputs are placed exactly as the state it was given (NamedShardings, one
  device included), so neither the update nor the sampler compiles again at the next step."""
  from kljax.sampling import _sample

  model, setup, fns, _, _, _ = run
  programs = fns["update"]._cache_size(), _sample._cache_size()
  _, state = grpo.build(setup.options, init_model=model)  # a fresh state, through the same programs
  with jax.set_mesh(setup.mesh):
    for _ in range(3):
      state, _ = grpo.train_step(setup, state, fns)
  assert (fns["update"]._cache_size(), _sample._cache_size()) == programs


_SLOW_DIGEST = """
import asyncio, runpy, sys
from kljax.train import checkpoint
write = checkpoint.DigestHandler._write
async def slow(self, directory, args):  # the digest of a save lags behind the next rollout
  await asyncio.sleep(2.0)
  await write(self, directory, args)
checkpoint.DigestHandler._write = slow
sys.argv = ["experiments.grpo", *sys.argv[1:]]
runpy.run_module("experiments.grpo", run_name="__main__")
"""


@pytest.mark.slow
def test_sigkill_during_a_save_resumes_from_the_previous_checkpoint(data_dir, sft_dir, tmp_path):
  """A save whose digest is still being written (2 s late: the next update waits for it)
  is killed with SIGKILL: the unfinished checkpoint is not taken for one, the rerun resumes from
  the previous one and reproduces the uninterrupted run's metrics."""
  import os
  import signal
  import subprocess
  import sys
  import time

  from test_grpo import REPO, _cli, assert_same_runs, child_xla_flags

  env = dict(os.environ, XLA_FLAGS=child_xla_flags())
  flags = [f"--config.data.data_dir={data_dir}"]
  clean = subprocess.run(_cli(tmp_path / "clean", sft_dir, *flags), cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
  assert clean.returncode == 0, clean.stderr[-2000:]
  killed = tmp_path / "killed"
  argv = [sys.executable, "-c", _SLOW_DIGEST, *_cli(killed, sft_dir, *flags)[3:]]
  proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while not list((killed / "checkpoints").glob("4.orbax-checkpoint-tmp*")):  # step 4 is saving
    assert proc.poll() is None and time.time() < deadline, "the run ended before saving step 4"
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not (killed / "checkpoints" / "4").exists()  # killed mid-save
  resumed = subprocess.run(_cli(killed, sft_dir, *flags), cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert_same_runs(tmp_path / "clean", killed, steps=6)
