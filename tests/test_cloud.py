"""Run paths on a real GCS API: `gcp-storage-emulator` on 127.0.0.1 (tests/conftest.py), reached by
gcsfs (epath) and by orbax's TensorStore, as a bucket would be. Each test runs in its own gs://
directory and fails if anything wrote a local folder named `gs:`.

What these cannot show: authentication, throughput and latency of a real bucket, and processes on
several hosts (tests/test_multiprocess.py runs two processes on this one)."""

import json
import os
import signal
import struct
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kljax import data, models, paths, text
from kljax.train import grpo, runlock
from kljax.train.checkpoint import Checkpointer
from kljax.train.metrics import MetricsWriter, read_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_grpo import TIMING, _cli, tiny_config  # noqa: E402

STEPS, EVERY = 4, 2


def _p(url):
  return paths.resolve(url)


def _upload(local, url):
  paths.copy_tree(paths.resolve(local), _p(url))
  return url


def test_a_missing_package_is_named_before_anything_runs(data_dir, tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "gcsfs", None)  # `import gcsfs` raises ImportError
  monkeypatch.chdir(tmp_path)
  with pytest.raises(grpo.ConfigError, match=r"^--workdir: gs://bkt/run: reaching gs:// paths "
                                             r"needs the package gcsfs, which is not installed: "
                                             r"pip install 'kljax\[gcs\]'$"):
    grpo.train(tiny_config(data_dir), "gs://bkt/run", progress=False)
  with pytest.raises(grpo.ConfigError, match=r"^--config.model.init: gs://bkt/m: .*gcsfs"):
    grpo.validate(tiny_config(data_dir, **{"model.init": "gs://bkt/m"}))
  with pytest.raises(grpo.ConfigError, match=r"^--workdir: ftp://h/run: the scheme ftp:// is not "
                                             r"supported"):
    grpo.validate(tiny_config(data_dir), "ftp://h/run")
  assert os.listdir(tmp_path) == []


def test_an_unreachable_bucket_is_named_before_anything_runs(data_dir, gcs_dir):
  with pytest.raises(grpo.ConfigError, match=r"^--workdir: gs://no-such-bucket/run: the bucket "
                                             r"gs://no-such-bucket does not exist\.$"):
    grpo.validate(tiny_config(data_dir), "gs://no-such-bucket/run")
  grpo.validate(tiny_config(data_dir), f"{gcs_dir}/run")  # the probe object is gone again
  assert not _p(gcs_dir).exists()


def test_checkpoints_round_trip_skip_unfinished_saves_and_reject_damage(gcs_dir, capsys):
  state = {"w": jnp.arange(4096, dtype=jnp.float32), "b": jnp.ones(3, jnp.bfloat16),
           "step": jnp.int32(0)}
  ckpt = Checkpointer(gcs_dir, every=1, keep=3)
  assert os.fspath(ckpt.directory) == f"{gcs_dir}/checkpoints"  # the URL, unchanged
  for step in (1, 2, 3):
    ckpt.maybe_save(step, jax.tree.map(lambda x, s=step: x + s, state))
  ckpt.close()
  restored = Checkpointer(gcs_dir, every=1).restore(state)
  assert restored.step == 3 and not restored.rejected
  assert np.array_equal(restored.state["w"], np.arange(4096, dtype=np.float32) + 3)
  assert restored.state["b"].dtype == jnp.bfloat16

  # A save stopped before orbax's commit marker is not a checkpoint.
  (ckpt.directory / "3" / "commit_success.txt").unlink()
  # Flipped bytes in the largest array file of step 2.
  files = [p for _, p in paths.files_under(ckpt.directory / "2" / "state" / "ocdbt.process_0")
           if p.parent.name == "d"]
  target = max(files, key=lambda p: len(p.read_bytes()))
  raw = bytearray(target.read_bytes())
  raw[len(raw) // 2:len(raw) // 2 + 64] = bytes(b ^ 0xFF for b in raw[len(raw) // 2:][:64])
  target.write_bytes(bytes(raw))

  again = Checkpointer(gcs_dir, every=1, keep=3)
  restored = again.restore(state)
  assert restored.step == 1 and [s for s, _ in restored.rejected] == [2]
  assert np.array_equal(restored.state["w"], np.arange(4096, dtype=np.float32) + 1)
  assert "array w differs from the digest recorded at save" in capsys.readouterr().err
  rejected = _p(gcs_dir) / "rejected_checkpoints" / "2"
  assert (rejected / "digest" / "digest.0.json").exists()
  assert not (ckpt.directory / "2").exists()
  # The next save of step 3 replaces the unfinished one.
  again.maybe_save(3, jax.tree.map(lambda x: x + 7, state))
  again.close()
  restored = Checkpointer(gcs_dir, every=1).restore(state)
  assert restored.step == 3 and np.array_equal(restored.state["w"],
                                               np.arange(4096, dtype=np.float32) + 7)


def _events(blob: bytes) -> list[tuple[str, int, float]]:
  """(tag, step, value) of the scalars of a TensorBoard event file (TFRecord framing: length,
  its CRC, the record, its CRC)."""
  from tensorboardX.proto import event_pb2

  out, i = [], 0
  while i < len(blob):
    (n,) = struct.unpack("<Q", blob[i:i + 8])
    event = event_pb2.Event.FromString(blob[i + 12:i + 12 + n])
    out += [(v.tag, event.step, v.simple_value) for v in event.summary.value]
    i += 12 + n + 4
  return out


def test_metrics_reach_the_store_whole_at_each_sync(gcs_dir):
  run = _p(gcs_dir)
  writer = MetricsWriter(gcs_dir, tensorboard=True)
  writer.write(0, {"reward": 0.5})
  writer.write(1, {"reward": 0.25})
  assert not (run / "metrics.jsonl").exists()  # nothing is appended: uploaded at `sync`
  writer.sync()
  assert read_jsonl(run / "metrics.jsonl") == [{"step": 0, "reward": 0.5},
                                               {"step": 1, "reward": 0.25}]
  writer.write(2, {"reward": 1.0})
  writer.close()  # uploads the rest
  assert [r["step"] for r in read_jsonl(f"{gcs_dir}/metrics.jsonl")] == [0, 1, 2]
  (event_file,) = list((run / "tensorboard").iterdir())
  assert _events(event_file.read_bytes()) == [("reward", 0, 0.5), ("reward", 1, 0.25),
                                              ("reward", 2, 1.0)]

  resumed = MetricsWriter(gcs_dir, resume_step=1, tensorboard=False)  # checkpoint 2: steps 0, 1
  assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == [0, 1]
  resumed.write(2, {"reward": 0.75})
  resumed.close()
  assert read_jsonl(run / "metrics.jsonl")[-1] == {"step": 2, "reward": 0.75}


def test_the_run_lock_is_a_lease_on_an_object_store(gcs_dir, monkeypatch):
  monkeypatch.setattr(runlock, "SETTLE_S", 0.05)
  monkeypatch.setattr(runlock, "RENEW_S", 0.2)
  lock = _p(gcs_dir) / runlock.LOCK_FILE
  with runlock.hold(gcs_dir) as path:
    assert path == os.fspath(lock)
    first = json.loads(lock.read_text())
    assert first["pid"] == os.getpid()
    time.sleep(0.6)
    assert json.loads(lock.read_text())["renewed"] > first["renewed"]  # renewed while held
    with runlock.hold(gcs_dir):  # re-entrant in one process
      pass
    assert lock.exists()
  assert not lock.exists()  # released: deleted

  def lease(**fields):
    lock.write_text(json.dumps({"host": "tpu-w-0", "pid": 1, "started": "T",
                                "renewed": time.time(), "token": "t"} | fields))

  lease()
  with pytest.raises(runlock.RunLockedError, match=rf"--workdir {gcs_dir} is in use by another "
                                                   r"run \(host tpu-w-0, pid 1, started T, lock "
                                                   r"renewed \d+ s ago\).*expires 120 s after"):
    grpo.train(tiny_config("unused"), gcs_dir, progress=False)
  lease(renewed=time.time() - runlock.LEASE_S - 1)  # expired
  with runlock.hold(gcs_dir):
    assert json.loads(lock.read_text())["pid"] == os.getpid()
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  lease(host=__import__("socket").gethostname(), pid=dead.pid)  # this host, process gone
  with runlock.hold(gcs_dir):
    assert json.loads(lock.read_text())["pid"] == os.getpid()


def test_model_tokenizer_and_datasets_from_the_store(gcs_dir, data_dir, sft_dir, tmp_path,
                                                      monkeypatch):
  model = models.from_hf(sft_dir)
  models.export_hf(model, f"{gcs_dir}/sft")
  assert {p.name for p in (_p(gcs_dir) / "sft").iterdir()} == {"config.json",
                                                               "model.safetensors"}
  assert models.check_hf(f"{gcs_dir}/sft") == model.config
  back = models.from_hf(f"{gcs_dir}/sft")
  for a, b in zip(jax.tree.leaves(model), jax.tree.leaves(back)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  from tokenizers import Tokenizer, models as tok_models

  tok = Tokenizer(tok_models.WordLevel({"<eos>": 0, "hi": 1, "[UNK]": 2}, unk_token="[UNK]"))
  (_p(gcs_dir) / "tok" / "tokenizer.json").write_text(tok.to_str())
  (_p(gcs_dir) / "tok" / "tokenizer_config.json").write_text('{"eos_token": "<eos>"}')
  hf = text.HFTokenizer(f"{gcs_dir}/tok")
  assert (hf.eos_id, hf.encode("hi")) == (0, [1])

  # data_dir in the store: prepared here and copied up by the first reader ...
  rows = [{"question": "What is 2+3?", "answer": "2+3=5\n#### 5"}]
  for split in ("train", "test"):
    (_p(gcs_dir) / "manual" / f"{split}.jsonl").write_text(json.dumps(rows[0]) + "\n")
  store = f"{gcs_dir}/tfds"
  first = data.load("gsm8k", "train", data_dir=store, manual_dir=f"{gcs_dir}/manual")
  assert first[0] == {"question": "What is 2+3?", "solution": "2+3=5\n#### 5", "answer": "5"}
  assert (_p(store) / "kljax_gsm8k" / "1.0.0" / "dataset_info.json").exists()
  # ... and copied down by a reader elsewhere (another cache: another host), not prepared again.
  monkeypatch.setenv("KLJAX_CACHE", str(tmp_path / "other_host"))
  monkeypatch.setattr(data.builders.KljaxGsm8k, "_split_generators", None)
  assert data.load("gsm8k", "train", data_dir=store)[0] == first[0]
  assert (tmp_path / "other_host" / "mirror" / "gs").is_dir()


def _cli_here(workdir, init, data_dir, tmp_path):
  """The CLI, run from `tmp_path` (so a URL taken for a local path would show up there)."""
  cmd = _cli(workdir, init, f"--config.data.data_dir={data_dir}", f"--config.num_steps={STEPS}",
             f"--config.checkpoint_every={EVERY}", "--config.metrics.tensorboard=True")
  cmd[cmd.index("configs/grpo_tiny.py")] = os.path.join(REPO, "configs", "grpo_tiny.py")
  env = dict(os.environ, PYTHONPATH=REPO)
  return cmd, dict(cwd=tmp_path, env=env)


@pytest.mark.slow
def test_trainer_kill_and_resume_on_the_store(gcs_dir, data_dir, sft_dir, tmp_path):
  init = _upload(sft_dir, f"{gcs_dir}/init")  # model.init in the store too
  config = tiny_config(data_dir, num_steps=STEPS, checkpoint_every=EVERY,
                       **{"model.init": init, "metrics.tensorboard": True})
  clean = grpo.train(config, f"{gcs_dir}/clean", init_model=models.from_hf(init), progress=False)
  run = _p(gcs_dir) / "clean"
  rows = read_jsonl(run / "metrics.jsonl")
  assert [r["step"] for r in rows] == list(range(STEPS)) and len(clean) == STEPS
  assert 0 < rows[0]["reward_mean"] < 1
  assert Checkpointer(run, every=EVERY).latest_step() == STEPS
  assert (run / "tensorboard").is_dir() and not (run / runlock.LOCK_FILE).exists()

  killed = f"{gcs_dir}/killed"
  cmd, kw = _cli_here(killed, init, data_dir, tmp_path)
  log = tmp_path / "killed.log"  # a file, not a pipe nobody reads while polling
  with open(log, "w") as f:
    proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, **kw)
  marker = _p(killed) / "checkpoints" / str(EVERY) / "commit_success.txt"
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None and not marker.exists():
    time.sleep(0.1)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert marker.exists(), log.read_text()[-3000:]
  assert [r["step"] for r in read_jsonl(_p(killed) / "metrics.jsonl")][:EVERY] == list(
      range(EVERY))  # uploaded before the checkpoint's save began
  resumed = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  got = read_jsonl(_p(killed) / "metrics.jsonl")
  assert [r["step"] for r in got] == list(range(STEPS))
  for a, b in zip(rows, got):
    for k in a:
      if k not in TIMING:
        assert b[k] == a[k], (a["step"], k)  # bit-identical on CPU with the same seeds
