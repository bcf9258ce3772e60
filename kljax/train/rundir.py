"""What a run directory holds and what a run reaches: WORKDIR/config.json (one config a run
directory), the kinds of the files a run keeps there, and every path's reachability, checked
before anything is compiled, prepared or warm-started.
"""

from __future__ import annotations

import json
import os
import socket

import jax
import ml_collections
import numpy as np

from kljax import cli, models, paths, text
from kljax.train import config as defaults
from kljax.train import runlock
from kljax.train.options import ConfigError, as_names, as_numbers, with_defaults
from jax.experimental import multihost_utils


# ---------------------------------------------------------------- one config per run directory
# WORKDIR/config.json records the config a run was started with. A resume under other values of a
# field that shapes the trajectory would make one run of two configs, under one name: it stops
# before any work unless `resume_changed` says it is meant, and is then recorded. These fields
# cannot change the trajectory: how long the run is, how often it checkpoints and logs, where the
# prepared data lives, the device layout (a sharded step equals the single-device one), and how a
# stop or a hanging reward is handled. A prefix ends with ".".
CONFIG_FILE = "config.json"


FREE_FIELDS = ("num_steps", "checkpoint_every", "stop_grace_s", "resume_changed",
               "reward.timeout_s", "data.data_dir", "mesh.", "metrics.",
               "rollout.sync_tolerance", "rollout.vllm_kv_cache_gb")


_HISTORY = "resume_changes"  # config.json's record of the resumes that changed fields


def _free(field: str) -> bool:
  return any(field == f or (f.endswith(".") and field.startswith(f)) for f in FREE_FIELDS)


def _read_config_file(workdir) -> dict | None:
  """WORKDIR/config.json as a dict; None when absent; ConfigError when it cannot be read."""
  path = paths.resolve(workdir) / CONFIG_FILE
  if not path.exists():
    return None
  if path.is_dir():
    raise ConfigError(f"--workdir: {path} is a directory; kljax writes the run's config there. "
                      f"Move it aside.")
  try:
    return json.loads(path.read_text())
  except (ValueError, UnicodeDecodeError) as err:
    raise ConfigError(f"--workdir: {path} is not the JSON kljax wrote ({err}); it records the "
                      f"config this run was started with: restore it, or use a new --workdir."
                      ) from None


def config_changes(config: ml_collections.ConfigDict, workdir) -> dict[str, tuple]:
  """{field: (recorded, new)} of every field outside FREE_FIELDS whose value in `config` differs
  from WORKDIR/config.json's ({} when there is none). A field the file lacks (written by an older
  kljax) is compared with its default."""
  recorded = _read_config_file(workdir)
  if recorded is None:
    return {}
  recorded.pop(_HISTORY, None)
  old = _lists_as_tuples(cli.flatten(recorded))
  new = _lists_as_tuples(cli.flatten(json.loads(config.to_json_best_effort())))
  default = _lists_as_tuples(cli.flatten(json.loads(defaults.grpo_tiny().to_json_best_effort())))
  missing = object()
  changes = {}
  for field in sorted(set(old) | set(new)):
    if _free(field):
      continue
    a, b = old.get(field, default.get(field, missing)), new.get(field, missing)
    if a != b:
      changes[field] = tuple("(absent)" if v is missing else v for v in (a, b))
  return changes


def _lists_as_tuples(flat: dict) -> dict:
  """The list fields as tuples of their items, whether recorded as a list or (by an older kljax)
  as a comma string: "a,b" and ["a", "b"] are the same reward functions."""
  out = dict(flat)
  if "reward.fns" in out:
    out["reward.fns"] = as_names(out["reward.fns"])
  if "reward.weights" in out:
    try:
      out["reward.weights"] = as_numbers(out["reward.weights"])
    except (TypeError, ValueError):
      pass  # compared as given
  return out


def check_resume(config: ml_collections.ConfigDict, workdir) -> dict[str, tuple]:
  """`config_changes`; a ConfigError listing them (field: old -> new) unless `resume_changed`."""
  config = with_defaults(config)
  changes = config_changes(config, workdir)
  if changes and not config.resume_changed:
    listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changes.items())
    raise ConfigError(
        f"--workdir: {workdir} holds a run started with another config ({CONFIG_FILE}); this "
        f"command changes {listed}. A resume may change only {', '.join(FREE_FIELDS)}. Use a new "
        f"--workdir, or pass --config.resume_changed=True to continue this run under the new "
        f"values on purpose (recorded in {CONFIG_FILE} and metrics.jsonl).")
  return changes


def record_config(config: ml_collections.ConfigDict, workdir, changes: dict,
                  step: int | None = None) -> None:
  """Writes WORKDIR/config.json: `config`, and the record of earlier resumes that changed fields
  with, if `changes`, this one's (from checkpoint `step`)."""
  recorded = _read_config_file(workdir) or {}
  history = recorded.get(_HISTORY, [])
  if changes:
    history = history + [{"from_step": step, "changes": {k: list(v) for k, v in changes.items()}}]
  out = json.loads(config.to_json_best_effort())
  if history:
    out[_HISTORY] = history
  paths.write_atomic(paths.resolve(workdir) / CONFIG_FILE, json.dumps(out, indent=1))


def _run_paths(config, workdir) -> list[tuple[str, str]]:
  """(flag, path) of every path a run reads or writes that is set."""
  out = [("--workdir", workdir), ("--config.data.data_dir", config.data.data_dir),
         ("--config.data.manual_dir", config.data.get("manual_dir")),
         ("--config.model.tokenizer", config.model.tokenizer),
         ("--config.model.init", config.model.init)]
  return [(flag, str(path)) for flag, path in out if path]


def check_schemes(config, workdir) -> None:
  """Each URL among the run's paths has its package installed (gcsfs for gs://), so that a
  missing one is named before anything is compiled or prepared."""
  for flag, path in _run_paths(config, workdir):
    try:
      paths.check_reachable(path, flag=flag)
    except paths.PathError as err:
      raise ConfigError(str(err)) from None


def check_paths(config, workdir: str) -> None:
  """The run directory can be created and written, the data directory read (or created), and
  `model.tokenizer` and `model.init`, when set, load (the checkpoint without its weights)."""
  _check_dir("--workdir", workdir, write=True)
  _check_run_files(workdir)
  _check_dir("--config.data.data_dir", config.data.data_dir, write=False)
  if config.data.get("manual_dir"):
    path = paths.resolve(config.data.manual_dir)
    if not _reached("--config.data.manual_dir", path.is_dir):
      raise ConfigError(f"--config.data.manual_dir: {path} is not a directory.")
  if config.model.tokenizer:
    try:
      text.HFTokenizer(config.model.tokenizer)
    except Exception as err:  # noqa: BLE001 - tokenizers raises its own exception types
      raise ConfigError(f"--config.model.tokenizer: {err}") from None
  if config.model.init:
    try:
      models.check_hf(config.model.init, dtype=config.model.dtype,
                      param_dtype=config.model.param_dtype)
    except (OSError, ValueError) as err:  # hf.CheckpointError is a ValueError
      raise ConfigError(f"--config.model.init: {err}") from None


# What a run keeps in WORKDIR, by kind: one of another kind in its place fails only mid-run.
RUN_FILES = {"checkpoints": "directory", "metrics.jsonl": "file", CONFIG_FILE: "file",
             runlock.LOCK_FILE: "file", "sft": "directory", "tensorboard": "directory"}


def _check_run_files(workdir) -> None:
  """Each of RUN_FILES that exists in a local WORKDIR is of its kind (a directory where a file
  belongs, or the reverse, is an IsADirectoryError or a failed save later)."""
  root = paths.resolve(workdir)
  if not paths.is_local(root):
    return
  for name, kind in RUN_FILES.items():
    path = root / name
    if path.exists() and path.is_dir() != (kind == "directory"):
      raise ConfigError(f"--workdir: {path} is {'a directory' if path.is_dir() else 'a file'}, "
                        f"where the run keeps its {name} {kind}; move it aside.")


def _reached(flag: str, fn):
  """`fn()`, with an error of the store (no bucket, no credentials, no network) as a ConfigError
  naming `flag`."""
  try:
    return fn()
  except Exception as err:  # noqa: BLE001 - gcsfs, google-auth and aiohttp raise many types
    said = " ".join(str(err).split())[:300]
    raise ConfigError(f"{flag}: cannot reach it: {type(err).__name__}: {said}") from None


def _check_dir(flag: str, path: str, *, write: bool) -> None:
  """`path` is a directory, or can be made one: its nearest existing ancestor is a writable
  directory. With `write`, an existing `path` must be writable too (the data directory need not:
  it may hold prepared data). On an object store (gs://…), where directories exist only while
  objects lie under them: the bucket exists, `path` is not an object, and with `write` a probe
  object can be written and deleted (credentials allow writing), all before the warm start."""
  path = paths.resolve(path)
  if not paths.is_local(path):
    bucket = paths.bucket(path)
    if not _reached(flag, bucket.exists):
      raise ConfigError(f"{flag}: {path}: the bucket {bucket} does not exist.")
    if _reached(flag, path.is_file):
      raise ConfigError(f"{flag}: {path} is not a directory (an object of that name exists).")
    if write:
      probe = path / f".kljax_write_probe.{socket.gethostname()}.{os.getpid()}"
      _reached(flag, lambda: (probe.write_text("kljax"), probe.unlink()))
    return
  existing = path
  while not existing.exists() and existing.parent != existing:
    existing = existing.parent
  if not existing.is_dir():
    what = "is not a directory" if existing == path else f"cannot be created: {existing} is a file"
    raise ConfigError(f"{flag}: {path} {what}.")
  if (existing != path or write) and not os.access(existing, os.W_OK | os.X_OK):
    what = ("is not writable" if existing == path else
            f"cannot be created: {existing} is not writable")
    raise ConfigError(f"{flag}: {path} {what}.")


def check_shared(workdir) -> None:
  """With several processes: each sees the lock process 0 holds, i.e. all reach the same run
  directory, as orbax's multi-process checkpoints need (a local --workdir on each host would give
  each host a part of every checkpoint)."""
  if jax.process_count() == 1:
    return
  lock = paths.resolve(workdir) / runlock.LOCK_FILE
  seen = lock.exists()
  if not np.all(multihost_utils.process_allgather(np.int32(seen))):
    raise ConfigError(
        f"--workdir: {workdir} is not shared: "
        + ("this process" if not seen else "another process")
        + f" does not see {lock}, which process 0 holds. Every process must reach the same run "
        "directory: shared storage such as gs://BUCKET/RUN, or a network filesystem.")

