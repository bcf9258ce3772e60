"""Two local processes × 4 CPU devices, joined with jax.distributed on localhost (gloo), run the
same GRPO steps as one process with 8 devices: with a local run directory, and with every run path
on a GCS API on localhost (tests/conftest.py), each process with its own local cache as on its own
host."""

import os
import socket
import subprocess
import sys

import pytest

from kljax import models, paths
from kljax.train import grpo
from kljax.train.metrics import read_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_grpo import TIMING, child_xla_flags, tiny_config  # noqa: E402

FLAGS = ["--config.num_steps=2", "--config.checkpoint_every=1", "--config.batch_size=16",
         "--config.rollout.group_size=4", "--config.rollout.max_new_tokens=3",
         "--config.metrics.tensorboard=False", "--config.mesh.data=8", "--config.mesh.devices=0"]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def single(data_dir, sft_dir, tmp_path_factory):
  """The reference: one process, 8 devices."""
  history = grpo.train(tiny_config(data_dir, **{"mesh.data": 8, "mesh.devices": 0}),
                       str(tmp_path_factory.mktemp("single")), init_model=models.from_hf(sft_dir),
                       progress=False)
  assert 0 < history[0]["reward_mean"] < 1
  return history


def _two_processes(workdir, init, data_dir, cwd, caches=(None, None)) -> list[str]:
  port = _free_port()
  procs = []
  for i, cache in enumerate(caches):
    env = dict(os.environ, XLA_FLAGS=child_xla_flags(4),
               JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    if cache:
      env["KLJAX_CACHE"] = cache
    procs.append(subprocess.Popen(
        [sys.executable, "-m", "experiments.grpo", "--config",
         os.path.join(REPO, "configs", "grpo_tiny.py"), f"--workdir={workdir}",
         f"--config.model.init={init}", f"--config.data.data_dir={data_dir}", "--distributed",
         f"--coordinator=localhost:{port}", "--num_processes=2", f"--process_id={i}", *FLAGS],
        cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  outputs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
  return outputs


def _same(single, multi):
  assert [r["step"] for r in multi] == [0, 1]
  for a, b in zip(single, multi):
    for k in a:
      if k not in TIMING and k != "step":
        assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-5), (a["step"], k)


@pytest.mark.slow
def test_two_processes_equal_one_process(single, data_dir, sft_dir, tmp_path):
  workdir = tmp_path / "multi"
  _two_processes(workdir, sft_dir, data_dir, cwd=REPO)
  _same(single, read_jsonl(workdir / "metrics.jsonl"))  # written by process 0 only


@pytest.mark.slow
def test_two_processes_with_every_path_in_the_store(single, sft_dir, gcs_dir, tmp_path):
  init = f"{gcs_dir}/init"
  paths.copy_tree(paths.resolve(sft_dir), paths.resolve(init))
  store = f"{gcs_dir}/tfds"  # empty: process 0 prepares the dataset and copies it up
  caches = [str(tmp_path / f"host{i}") for i in range(2)]
  outputs = _two_processes(f"{gcs_dir}/multi", init, store, cwd=tmp_path, caches=caches)
  _same(single, read_jsonl(f"{gcs_dir}/multi/metrics.jsonl"))
  steps = paths.resolve(f"{gcs_dir}/multi/checkpoints")
  assert sorted(int(p.name) for p in steps.iterdir()) == [1, 2]
  for step in (1, 2):  # each process wrote its own shards and digest to the one location
    assert {p.name for p in (steps / str(step) / "digest").iterdir()} >= {"digest.0.json",
                                                                          "digest.1.json"}
  # Process 1 waited for process 0 and copied the prepared dataset down instead of preparing it.
  assert "Downloading and preparing dataset" in outputs[0]
  assert "Downloading and preparing dataset" not in outputs[1], outputs[1][-3000:]
  assert (tmp_path / "host1" / "mirror" / "gs").is_dir()
