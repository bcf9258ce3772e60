"""Faults of data, models and entry points (issue 25), injected into tiny configs: bad manual data
files, a dataset smaller than a step, prepared data gone stale or prepared by several runs at once,
a broken safetensors file, the warm start's tokenizer, the console scripts and the audit's progress.
Each stops before the warm start or any compilation with one line naming the file, line or flag, or
is survived."""

import json
import os
import re
import subprocess
import sys
import time

import pytest

from kljax.train import grpo

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_grpo import REPO, child_xla_flags, tiny_config  # noqa: E402

ROWS = [{"question": f"{a}+{a}=", "answer": f"{a}+{a}={2 * a}\n#### {2 * a}"} for a in range(8)]


def _manual(tmp_path, rows=ROWS, raw: bytes | None = None, name="manual"):
  """A GSM8K manual directory: train.jsonl holds `rows` (or the bytes `raw`), test.jsonl 2 rows."""
  manual = tmp_path / name
  manual.mkdir()
  train = raw if raw is not None else "".join(json.dumps(r) + "\n" for r in rows).encode()
  (manual / "train.jsonl").write_bytes(train)
  (manual / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS[:2]))
  return manual


def _gsm8k(tmp_path, manual, **changes):
  return tiny_config(str(tmp_path / "tfds"), **{"data.name": "gsm8k",
                                                "data.manual_dir": str(manual), **changes})


def _refused(config, match):
  grpo.validate(config)
  with pytest.raises(grpo.ConfigError, match=match) as err:
    grpo.check_prompt_lengths(config)
  assert "\n" not in str(err.value)
  return str(err.value)


# ---------------------------------------------------------------- data, up front


def test_empty_manual_file_is_named(tmp_path):
  manual = _manual(tmp_path, raw=b"\n")
  _refused(_gsm8k(tmp_path, manual),
           rf"--config.data.manual_dir: {manual}/train.jsonl: no examples \(the file is empty\)")


def test_non_utf8_byte_names_file_and_line(tmp_path):
  lines = [json.dumps(r).encode() for r in ROWS]
  lines[2] = lines[2].replace(b"2+2", b"2\xff2")
  manual = _manual(tmp_path, raw=b"\n".join(lines) + b"\n")
  _refused(_gsm8k(tmp_path, manual),
           rf"{manual}/train.jsonl: line 3: byte b'\\xff' at column \d+ is not UTF-8")


def test_missing_field_names_file_line_and_field(tmp_path):
  rows = list(ROWS)
  rows[4] = {"question": "4+4="}
  manual = _manual(tmp_path, rows)
  _refused(_gsm8k(tmp_path, manual),
           rf"{manual}/train.jsonl: line 5: no 'answer' field \(it has 'question'")


def test_dataset_smaller_than_one_steps_prompts(tmp_path):
  manual = _manual(tmp_path, ROWS[:3])
  # 16 completions in groups of 4: 4 prompts a step, 3 examples
  _refused(_gsm8k(tmp_path, manual, batch_size=16, **{"rollout.group_size": 4}),
           r"--config.batch_size: a step takes 4 prompts .* more than the 3 examples")


def test_bad_data_stops_the_cli_before_the_warm_start(tmp_path):
  rows = list(ROWS)
  rows[1] = {"answer": "#### 2"}
  manual = _manual(tmp_path, rows)
  workdir = tmp_path / "run"
  out = subprocess.run(
      [sys.executable, "-m", "experiments.grpo", "--config", "configs/grpo_tiny.py",
       f"--workdir={workdir}", "--config.data.name=gsm8k", f"--config.data.manual_dir={manual}",
       f"--config.data.data_dir={tmp_path / 'tfds'}", "--config.mesh.devices=1"],
      cwd=REPO, env=dict(os.environ, XLA_FLAGS=child_xla_flags()), capture_output=True, text=True,
      timeout=120)
  assert out.returncode == 1, out.stderr
  lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
  assert len(lines) == 1 and f"{manual}/train.jsonl: line 2: no 'question' field" in lines[0], \
      out.stderr
  assert not (workdir / "sft").exists()  # no warm start was made


# ---------------------------------------------------------------- prepared datasets


def test_changed_manual_files_are_prepared_again(tmp_path, capsys):
  from kljax import data

  manual = _manual(tmp_path)
  kw = dict(data_dir=str(tmp_path / "tfds"), manual_dir=str(manual))
  assert len(data.load("gsm8k", "train", **kw)) == len(ROWS)
  assert "prepared from other files" not in capsys.readouterr().err
  (manual / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS[:5]))
  assert len(data.load("gsm8k", "train", **kw)) == 5  # not the stale 8
  assert "was prepared from other files than" in capsys.readouterr().err
  assert len(data.load("gsm8k", "train", **kw)) == 5  # and now reused, silently
  assert "prepared from other files" not in capsys.readouterr().err


def test_runs_preparing_one_data_dir_at_once_take_turns(tmp_path):
  manual = _manual(tmp_path)
  code = ("import sys; from kljax import data; "
          "print(len(data.load('gsm8k', 'train', data_dir=sys.argv[1], manual_dir=sys.argv[2])))")
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "tfds"), str(manual)],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True) for _ in range(3)]
  outs = [p.communicate(timeout=120) for p in procs]
  assert [p.returncode for p in procs] == [0, 0, 0], [err[-2000:] for _, err in outs]
  assert [out.split()[-1] for out, _ in outs] == [str(len(ROWS))] * 3
  assert sum("Downloading and preparing" in out for out, _ in outs) == 1  # the others reused it
  versions = os.listdir(tmp_path / "tfds" / "kljax_gsm8k")
  assert versions == ["1.0.0"], versions  # no leftover incomplete copies


def test_read_only_empty_data_dir_is_one_line(tmp_path, monkeypatch):
  from kljax.data import builders

  manual = _manual(tmp_path)
  ro = tmp_path / "ro"
  ro.mkdir()
  ro.chmod(0o555)
  if os.geteuid() == 0:  # root writes through permissions: inject what the kernel says to others
    real_open = os.open

    def denied(path, *args, **kwargs):
      if str(path).endswith(builders.LOCK_FILE):
        raise PermissionError(13, "Permission denied", str(path))
      return real_open(path, *args, **kwargs)

    monkeypatch.setattr(builders.os, "open", denied)
  config = tiny_config(str(ro), **{"data.name": "gsm8k", "data.manual_dir": str(manual)})
  _refused(config, rf"--config.data.data_dir: {ro}: gsm8k is not prepared there and cannot be "
                   r"\(Permission denied\)")


# ---------------------------------------------------------------- models, up front


@pytest.fixture
def tiny_hf(tmp_path):
  """A random tiny checkpoint (2 layers) in the HF layout."""
  from kljax import models

  path = tmp_path / "init"
  models.export_hf(models.create(models.preset("tiny"), seed=0), str(path))
  return path


def _init_refused(tmp_path, init, match):
  config = tiny_config(str(tmp_path / "tfds"), **{"model.init": str(init)})
  with pytest.raises(grpo.ConfigError, match=match) as err:
    grpo.validate(config, str(tmp_path / "run"))
  assert "\n" not in str(err.value)


def test_truncated_safetensors_is_one_line_naming_the_file(tmp_path, tiny_hf):
  file = tiny_hf / "model.safetensors"
  data = file.read_bytes()
  file.write_bytes(data[:len(data) // 2])
  _init_refused(tmp_path, tiny_hf, rf"--config.model.init: {file}: truncated: {len(data) // 2} "
                                   rf"bytes, where its header lists tensors up to byte {len(data)}")
  file.write_bytes(data[:5])
  _init_refused(tmp_path, tiny_hf, rf"--config.model.init: {file}: truncated \(5 bytes")


@pytest.mark.parametrize("layers", [1, 3])
def test_layer_count_not_configs_is_named(tmp_path, tiny_hf, layers):
  cfg = json.loads((tiny_hf / "config.json").read_text())
  (tiny_hf / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": layers}))
  _init_refused(tmp_path, tiny_hf,
                rf"--config.model.init: {tiny_hf}/model.safetensors holds 2 layers, but "
                rf"{tiny_hf}/config.json says num_hidden_layers={layers}\.")


def test_tensor_shape_not_configs_is_named(tmp_path, tiny_hf):
  cfg = json.loads((tiny_hf / "config.json").read_text())
  (tiny_hf / "config.json").write_text(json.dumps({**cfg, "hidden_size": 32, "head_dim": 16}))
  _init_refused(tmp_path, tiny_hf, rf"--config.model.init: tensor model.embed_tokens.weight in "
                                   rf"{tiny_hf}/model.safetensors has shape \[64, 64\], but the "
                                   rf"config implies \[64, 32\]")


def _char_tokenizer_json(path):
  """A character-level HF tokenizer whose vocabulary (22) is not the built-in tokenizer's."""
  from tokenizers import Regex, Tokenizer, models, pre_tokenizers

  chars = list("0123456789+-*=#? \n")
  vocab = {t: i for i, t in enumerate(["<eos>", "<bos>", "[UNK]", *chars])}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
  path.mkdir()
  tok.save(str(path / "tokenizer.json"))
  (path / "tokenizer_config.json").write_text('{"eos_token": "<eos>", "bos_token": "<bos>"}')
  return path


def test_warm_start_uses_model_tokenizer(tmp_path):
  from kljax import text
  from kljax.train import sft

  tok = _char_tokenizer_json(tmp_path / "tok")
  manual = _manual(tmp_path)
  config = _gsm8k(tmp_path, manual, **{"model.tokenizer": str(tok), "sft.steps": 2,
                                       "sft.batch_size": 4, "data.max_prompt_len": 16})
  vocab = text.HFTokenizer(str(tok)).vocab_size
  assert vocab != text.CharTokenizer().vocab_size
  model = sft.initial_model(config, str(tmp_path / "sft"))
  assert model.config.vocab_size == vocab
  # the cached warm start, under another tokenizer: named, not used
  config.model.tokenizer = ""
  with pytest.raises(grpo.ConfigError, match=rf"--config.model.tokenizer: the warm start cached "
                                             rf"in {tmp_path}/sft has a vocabulary of {vocab}"):
    sft.initial_model(config, str(tmp_path / "sft"))


# ---------------------------------------------------------------- entry points


def test_console_scripts_point_at_installed_functions():
  """Each script's function is defined in the package (read, not imported: kljax.cli_grpo defines
  absl flags, which a second definition in this process would refuse)."""
  import ast
  import importlib.util
  import tomllib

  with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
    scripts = tomllib.load(f)["project"]["scripts"]
  assert set(scripts) >= {"kljax-grpo", "kljax-audit"}
  for target in scripts.values():
    module, _, fn = target.partition(":")
    assert module.split(".")[0] == "kljax", target  # installed, unlike experiments/
    with open(importlib.util.find_spec(module).origin) as f:
      tree = ast.parse(f.read())
    # A package may re-export the function from one of its modules (kljax.audit's from .cli).
    source = {a.asname or a.name: d.module for d in tree.body if isinstance(d, ast.ImportFrom)
              for a in d.names}
    if fn in source and source[fn].startswith(module + "."):
      with open(importlib.util.find_spec(source[fn]).origin) as f:
        tree = ast.parse(f.read())
    assert fn in {d.name for d in tree.body if isinstance(d, ast.FunctionDef)}, target


def test_kljax_grpo_runs_from_another_directory(tmp_path):
  """The console script's function, from a directory that is not the clone and with `experiments`
  not importable: the config path absolute, the run directory relative to the current one."""
  from kljax import models, text

  manual = _manual(tmp_path)
  init = tmp_path / "init"
  vocab = text.CharTokenizer().vocab_size
  models.export_hf(models.create(models.preset("tiny", vocab_size=vocab), seed=0), str(init))
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  argv = ["kljax-grpo", "--config", os.path.join(REPO, "configs", "grpo_tiny.py"),
          "--workdir", "run", "--config.data.name=gsm8k", f"--config.data.manual_dir={manual}",
          f"--config.data.data_dir={tmp_path / 'tfds'}", f"--config.model.init={init}",
          "--config.num_steps=2", "--config.batch_size=4", "--config.rollout.group_size=2",
          "--config.rollout.max_new_tokens=2", "--config.metrics.tensorboard=False",
          "--config.mesh.devices=1"]
  code = "import sys; sys.argv = sys.argv[1:]; from kljax.cli_grpo import run; run()"
  # PYTHONPATH holds the package alone (as an install would): no experiments/, no configs/
  site = tmp_path / "site"
  site.mkdir()
  os.symlink(os.path.join(REPO, "kljax"), site / "kljax")
  out = subprocess.run([sys.executable, "-c", code, *argv], cwd=elsewhere,
                       env=dict(os.environ, PYTHONPATH=str(site), XLA_FLAGS=child_xla_flags()),
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  rows = [json.loads(ln) for ln in (elsewhere / "run" / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [0, 1]
  assert subprocess.run([sys.executable, "-c", "import experiments"], cwd=elsewhere,
                        env=dict(os.environ, PYTHONPATH=str(site))).returncode != 0


# ---------------------------------------------------------------- the audit


def _audit(tmp_path, *args, timeout=120):
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), REPO]), JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "kljax.audit", *args], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=timeout)


def test_audit_prints_progress_naming_the_implementation(tmp_path):
  out = _audit(tmp_path, "--term", "k3_as_loss", "--seeds", "1")
  assert out.returncode == 0, out.stderr
  lines = out.stderr.splitlines()
  assert lines[0] == "kljax.audit: evaluating k3_as_loss"
  assert any(ln.startswith("kljax.audit: k3_as_loss: setting 1 of ") for ln in lines)
  assert re.fullmatch(r"kljax\.audit: k3_as_loss: done in \d+\.\d s", lines[-1]), lines
  assert "∇RKL" in out.stdout  # the report itself is unchanged, on stdout


def test_audit_timeout_stops_a_slow_function_with_one_line(tmp_path):
  (tmp_path / "slow_kl.py").write_text(
      "import time\n\ndef kl(logp, ref_logp):\n  time.sleep(60)\n  return logp - ref_logp\n")
  start = time.monotonic()
  out = _audit(tmp_path, "slow_kl:kl", "--timeout", "2")
  assert time.monotonic() - start < 40
  assert out.returncode == 3, out.stderr
  lines = out.stderr.splitlines()
  assert lines[0] == "kljax.audit: evaluating slow_kl:kl", lines
  assert lines[-1] == "kljax.audit: slow_kl:kl: timed out after 2 s (--timeout); stopping.", lines
  assert "Traceback" not in out.stderr


def test_dataset_smaller_than_a_warm_start_batch(tmp_path):
  from kljax.train import sft

  config = _gsm8k(tmp_path, _manual(tmp_path), **{"sft.batch_size": 64})
  with pytest.raises(grpo.ConfigError, match=r"--config.sft.batch_size: the warm start takes 64 "
                                             r"examples a step, more than the 8 of gsm8k"):
    sft.initial_model(config, str(tmp_path / "sft"))
  assert not (tmp_path / "sft").exists()
