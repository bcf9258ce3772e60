"""benchmarks/real_shape.py reduced: one layer of qwen2.5-0.5b with the real vocabulary and widths,
GRPO on 8 simulated devices (fsdp=8, bfloat16, remat), checkpoint, SIGKILL and resume."""

import importlib.util
import os
import signal

import pytest

from kljax import models

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                     "real_shape.py")
_SPEC = importlib.util.spec_from_file_location("real_shape", _PATH)
real_shape = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(real_shape)


@pytest.mark.slow
def test_real_vocabulary_run_saves_survives_a_kill_and_resumes(data_dir, tmp_path):
  result = real_shape.main(["--layers", "1", "--steps", "2", "--prompts", "2", "--group", "4",
                            "--new_tokens", "4", "--param_dtype", "bfloat16", "--data_dir", data_dir,
                            "--workdir", str(tmp_path)])
  cfg = models.preset("qwen2.5-0.5b").replace(num_layers=1)
  # Parameter bytes from the published shapes (HF count, bfloat16), independent of the trainer:
  # all but the norm vectors and q/k/v biases split 8 ways.
  total = cfg.num_params() * 2
  L, D, H, K, Hd = cfg.num_layers, cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  replicated = 2 * ((2 * L + 1) * D + L * (H + 2 * K) * Hd)
  killed, resumed = result["killed"], result["resumed"]
  assert killed["param_bytes_total"] == total
  assert killed["param_bytes_per_device"] == (total - replicated) // 8 + replicated
  assert killed["param_bytes_per_device"] <= 1.001 * total / 8
  assert killed["exit"] == -signal.SIGKILL
  assert (tmp_path / "checkpoints" / "2").exists()  # the resumed run finished and saved
  assert [int(r["step"]) for r in result["metrics"]] == [0, 1]
  assert resumed["steps_run"] == [1]
  for r in result["metrics"]:
    assert r["exact_rkl"] >= 0 and all(r[k] > 0 for k in ("time_rollout", "time_update"))
