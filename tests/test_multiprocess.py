"""Two local processes × 4 CPU devices, joined with jax.distributed on localhost (gloo), run the
same GRPO steps as one process with 8 devices."""

import os
import socket
import subprocess
import sys

import pytest

from kljax import data, models
from kljax.train import grpo
from kljax.train.metrics import read_jsonl
from kljax.train.sft import train_sft

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_grpo import TIMING, tiny_config  # noqa: E402

FLAGS = ["--config.num_steps=2", "--config.checkpoint_every=1", "--config.batch_size=16",
         "--config.rollout.group_size=4", "--config.rollout.max_new_tokens=3",
         "--config.metrics.tensorboard=False", "--config.mesh.data=8", "--config.mesh.devices=0"]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_equal_one_process(tmp_path):
  data_dir = str(tmp_path / "tfds")
  data.load("arithmetic/level1", "train", data_dir=data_dir)  # prepared once, before the workers
  sft_dir = str(tmp_path / "sft")
  models.export_hf(train_sft(preset="tiny", dataset="arithmetic/level1", data_dir=data_dir,
                             steps=150, progress=False)[0], sft_dir)

  single = grpo.train(tiny_config(data_dir, **{"mesh.data": 8, "mesh.devices": 0}),
                      str(tmp_path / "single"), init_model=models.from_hf(sft_dir), progress=False)

  port = _free_port()
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
  workdir = tmp_path / "multi"
  procs = [subprocess.Popen(
      [sys.executable, "-m", "experiments.grpo", "--config", "configs/grpo_tiny.py",
       f"--workdir={workdir}", f"--config.model.init={sft_dir}", f"--config.data.data_dir={data_dir}",
       "--distributed", f"--coordinator=localhost:{port}", "--num_processes=2", f"--process_id={i}",
       *FLAGS], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(2)]
  outputs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]

  multi = read_jsonl(str(workdir / "metrics.jsonl"))  # written by process 0 only
  assert [r["step"] for r in multi] == [0, 1]
  assert 0 < single[0]["reward_mean"] < 1
  for a, b in zip(single, multi):
    for k in a:
      if k not in TIMING and k != "step":
        assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-5), (a["step"], k)
