"""The command lines explain themselves: `--help`, misspelled keys, output that is not a terminal,
a finished run, the summary line, and the optional W&B sink read back from its offline files."""

import glob
import io
import json
import os
import re
import struct
import subprocess
import sys
import time

import numpy as np
import pytest

from kljax import cli, progress
from kljax.train import config as config_lib
from kljax.train import metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_grpo import child_xla_flags  # noqa: E402


def _run(*args, timeout=300, env=None):
  env = dict(os.environ if env is None else env)
  env["XLA_FLAGS"] = child_xla_flags()  # one CPU device: the CLI runs below are single-device
  return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=timeout)


# ---------------------------------------------------------------- --help


def test_every_config_field_has_a_one_line_meaning():
  fields = cli.flatten(config_lib.grpo_tiny())
  docs = cli.field_docs()
  assert set(fields) == set(docs), set(fields) ^ set(docs)
  assert all(docs[k].strip() for k in fields)


def test_grpo_help_lists_every_field_with_its_default_and_meaning():
  out = _run("experiments.grpo", "--help")
  assert out.returncode == 0, out.stderr
  lines = out.stdout.splitlines()
  docs = cli.field_docs()
  for key, value in cli.flatten(config_lib.grpo_tiny()).items():
    line = next((ln for ln in lines if ln.split()[:1] == [key]), None)
    assert line is not None, key
    assert repr(value) in line and docs[key] in line, line
  beta = next(ln for ln in lines if ln.split()[:1] == ["kl.beta"])
  assert beta.split()[1] == "0.05" and "KL coefficient" in beta
  assert "--workdir" in out.stdout and "Traceback" not in out.stderr


def test_grpo_help_shows_the_chosen_config_files_values():
  out = _run("experiments.grpo", "--config", "configs/grpo_countdown.py", "--help")
  assert out.returncode == 0, out.stderr
  name = next(ln for ln in out.stdout.splitlines() if ln.split()[:1] == ["data.name"])
  assert "'countdown/n3'" in name


@pytest.mark.parametrize("module,flag,default", [("experiments.sft", "--steps", "400"),
                                                 ("experiments.reproduce", "--compile_cache",
                                                  "~/.cache/kljax/jax_cache")])
def test_other_entry_points_help_exits_zero_with_defaults(module, flag, default):
  out = _run(module, "--help")
  assert out.returncode == 0, out.stderr
  flags_part = out.stdout[out.stdout.index("\nflags:"):]
  entry = flags_part[flags_part.index(f"  {flag}:"):].split("\n  --")[0]
  assert f"(default: '{default}')" in entry, entry


def test_reproduce_help_lists_its_settings_with_meanings():
  out = _run("experiments.reproduce", "--help")
  assert out.returncode == 0, out.stderr
  beta = next(ln for ln in out.stdout.splitlines() if ln.split()[:1] == ["beta"])
  assert beta.split()[1] == "0.5" and "β" in beta  # the full preset's value, configs/reproduce.py


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("extra", [[], ["--config", "configs/grpo_tiny.py"]])
def test_misspelled_config_key_is_one_line_with_the_closest_key(tmp_path, extra):
  out = _run("experiments.grpo", *extra, f"--workdir={tmp_path}", "--config.kl.bta=0.1")
  assert out.returncode != 0
  assert "Traceback" not in out.stderr
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1, out.stderr
  assert "--config.kl.bta" in lines[0] and "--config.kl.beta" in lines[0]


def test_misspelled_flag_is_one_line_with_the_closest_flag(tmp_path):
  out = _run("experiments.grpo", f"--workdri={tmp_path}")
  assert out.returncode != 0 and "Traceback" not in out.stderr
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and "workdri" in lines[0] and "workdir" in lines[0], out.stderr


def test_a_config_that_cannot_run_is_one_line(tmp_path):
  out = _run("experiments.grpo", f"--workdir={tmp_path}", "--config.kl.term=k9_as_loss")
  assert out.returncode == 1 and "Traceback" not in out.stderr
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("python -m experiments.grpo: --config.kl.term")


def test_closest_is_difflib():
  assert cli.closest("kl.bta", ["kl.beta", "kl.term", "seed"]) == "kl.beta"
  assert cli.closest("zzzz", ["kl.beta"]) is None


# ---------------------------------------------------------------- progress off a terminal


def test_log_lines_print_every_tenth_without_carriage_returns():
  out = io.StringIO()
  bar = progress.bar(range(40), desc="grpo", unit="step", file=out)
  assert isinstance(bar, progress.LogLines)  # a StringIO is not a terminal
  for i in bar:
    bar.set_postfix(reward=f"{i:.1f}")
  text = out.getvalue()
  assert "\r" not in text
  lines = text.splitlines()
  assert [ln.split()[1] for ln in lines] == [f"{4 * k}/40" for k in range(1, 11)]
  assert lines[-1] == lines[-1].split(" in ")[0] + " in 0 s; reward=39.0"


def test_log_lines_resume_from_initial_and_respect_disable():
  out = io.StringIO()
  bar = progress.LogLines(range(5), initial=5, total=10, desc="x", file=out, fraction=0.5)
  list(bar)
  assert [ln.split()[1] for ln in out.getvalue().splitlines()] == ["10/10"]
  quiet = io.StringIO()
  list(progress.LogLines(range(5), file=quiet, disable=True))
  assert quiet.getvalue() == ""


# ---------------------------------------------------------------- the summary line


def test_window_means_are_numpy_means_of_the_first_and_last_tenth():
  r = np.random.default_rng(0).random(37)
  rows = [{"step": i, "reward_mean": float(v)} for i, v in enumerate(r)]
  (a0, b0, m0), (a1, b1, m1) = metrics.window_means(rows, "reward_mean")
  n = 4  # round(0.1 × 37)
  assert (a0, b0, a1, b1) == (0, n - 1, 37 - n, 36)
  assert m0 == pytest.approx(r[:n].mean()) and m1 == pytest.approx(r[-n:].mean())
  line = metrics.summary(rows)
  assert f"{r[:n].mean():.3f} (mean of steps 0–3)" in line
  assert f"{r[-n:].mean():.3f} (mean of steps 33–36)" in line


# ---------------------------------------------------------------- Weights & Biases


def _wandb_records(path):
  """The protobuf records of a .wandb file, read as the LevelDB log format it is written in
  (32 KiB blocks of [crc32 u32, length u16, type u8, data] chunks after a 7-byte header)."""
  from wandb.proto import wandb_internal_pb2

  data = open(path, "rb").read()
  assert data[:4] == b":W&B"
  block, pos, buf, out = 32768, 7, b"", []
  while pos + 7 <= len(data):
    if block - pos % block < 7:
      pos += block - pos % block
      continue
    _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
    pos += 7
    if (n == 0 and kind == 0) or pos + n > len(data):  # the end, or a chunk still being written
      break
    buf, pos = buf + data[pos:pos + n], pos + n
    if kind in (1, 4):  # FULL or LAST chunk: a record is complete
      record = wandb_internal_pb2.Record()
      record.ParseFromString(buf)
      out.append(record)
      buf = b""
  return out


def _wandb_history(workdir, timeout_s=60.0):
  """The history rows of every offline W&B run under WORKDIR/wandb. wandb's service process writes
  the file after `finish` returns: each file is read once it ends with its run's exit record."""
  rows = []
  for path in sorted(glob.glob(os.path.join(workdir, "wandb", "offline-run-*", "run-*.wandb"))):
    deadline = time.monotonic() + timeout_s
    while True:
      records = _wandb_records(path)
      if records and records[-1].WhichOneof("record_type") == "exit":
        break
      assert time.monotonic() < deadline, f"{path}: no exit record after {timeout_s} s"
      time.sleep(0.2)
    for record in records:
      if record.WhichOneof("record_type") == "history":
        items = record.history.item
        rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                     for item in items})
  return rows


def test_wandb_offline_run_holds_every_row(tmp_path, monkeypatch):
  monkeypatch.setenv("WANDB_SILENT", "true")
  rows = [{"reward_mean": 0.25 * i, "exact_rkl": 1e-3 * i} for i in range(3)]
  writer = metrics.MetricsWriter(tmp_path, tensorboard=False, wandb_project="kljax-test",
                                 run_config={"kl": {"beta": 0.05}})
  for step, row in enumerate(rows):
    writer.write(step, row)
  writer.close()
  history = _wandb_history(str(tmp_path))
  assert [h["_step"] for h in history] == [0, 1, 2]
  for h, row in zip(history, rows):
    assert {k: h[k] for k in row} == pytest.approx(row)


def test_without_wandb_nothing_changes_and_asking_for_it_names_the_extra(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
  writer = metrics.MetricsWriter(tmp_path, tensorboard=False)
  writer.write(0, {"reward_mean": 1.0})
  writer.close()
  assert metrics.read_jsonl(tmp_path / "metrics.jsonl") == [{"step": 0, "reward_mean": 1.0}]
  with pytest.raises(ValueError, match=r"pip install 'kljax\[wandb\]'"):
    metrics.MetricsWriter(tmp_path / "w", tensorboard=False, wandb_project="kljax-test")
  from kljax.train import grpo

  c = config_lib.grpo_tiny()
  grpo.validate(c)  # metrics.wandb is off by default: wandb is never imported
  c.metrics.wandb = True
  with pytest.raises(grpo.ConfigError, match=r"--config.metrics.wandb: .*'kljax\[wandb\]'"):
    grpo.validate(c)


# ---------------------------------------------------------------- a run, piped


@pytest.mark.slow
def test_a_piped_run_logs_plain_lines_and_a_rerun_says_it_is_complete(data_dir, tmp_path):
  workdir = tmp_path / "run"
  args = ["experiments.grpo", "--config", "configs/grpo_tiny.py", f"--workdir={workdir}",
          f"--config.data.data_dir={data_dir}", "--config.sft.steps=4", "--config.sft.batch_size=16",
          "--config.num_steps=4", "--config.checkpoint_every=2", "--config.batch_size=16",
          "--config.rollout.group_size=4", "--config.rollout.max_new_tokens=3",
          "--config.metrics.tensorboard=False", "--config.mesh.devices=1",
          "--config.metrics.wandb=True"]
  env = dict(os.environ, WANDB_SILENT="true")
  out = _run(*args, timeout=900, env=env)
  assert out.returncode == 0, out.stderr[-3000:]
  log = out.stdout + out.stderr
  assert "\r" not in log
  assert "sft: 4/4 step (100%)" in log and "grpo: 4/4 step (100%)" in log, log
  # absl's INFO lines (TFDS's "Load dataset info", JAX's "Unable to initialize backend") start
  # with I and the date: none reach the log.
  assert not re.search(r"^[IW]\d{4} \d\d:\d\d", log, re.M), log
  assert "Traceback" not in log

  rows = metrics.read_jsonl(workdir / "metrics.jsonl")
  assert [r["step"] for r in rows] == [0, 1, 2, 3]
  # the run's config.json labels it in experiments.plot by KL term and β (grpo_tiny's defaults)
  from experiments.plot import run_label
  assert run_label(str(workdir), rows) == "k2_as_loss, β = 0.05"
  # 4 steps: the first and last 10% are one step each (at least one row a window)
  first, last = rows[0]["reward_mean"], rows[-1]["reward_mean"]
  assert f"reward {first:.3f} (mean of step 0) -> {last:.3f} (mean of step 3)" in out.stdout

  history = _wandb_history(str(workdir))
  assert [h["_step"] for h in history] == [0, 1, 2, 3]
  for h, row in zip(history, rows):  # every metric, timings and the batch's token hash included
    assert {k: h[k] for k in row if k != "step"} == pytest.approx(
        {k: v for k, v in row.items() if k != "step"}, nan_ok=True)

  again = _run(*args, timeout=300, env=env)
  assert again.returncode == 0, again.stderr[-3000:]
  assert again.stdout.startswith("run complete: 4 of 4 steps done")
  assert str(workdir / "metrics.jsonl") in again.stdout
  assert len(_wandb_history(str(workdir))) == 4  # nothing ran, nothing more was logged
