"""GRPO with any KL term.

  kljax-grpo --config configs/grpo_tiny.py --workdir DIR [--config.kl.term=...]
  python -m experiments.grpo …   (the same, from a clone of the repository)

The console script `kljax-grpo` is installed with the package and runs from any directory: paths
(`--config`, `--workdir`, the config's paths) are taken as given, relative ones from the current
directory. Without --config: configs/grpo_tiny.py there, else the same defaults from the package
(kljax/train/config.py).

Writes DIR/metrics.jsonl (one object a step), DIR/tensorboard, DIR/checkpoints; rerunning the same
command resumes from the newest checkpoint that verifies. A run holds DIR's lock until it exits.
DIR (and every path of the config) may be a local directory or a URL such as gs://BUCKET/RUN.
Rerunning a finished run says so (its last step, where its metrics are) and exits 0. `--help` lists
every config field with its default and meaning. Errors that need no traceback (a bad flag or path, a
held DIR, a checkpoint that cannot be saved or restored, a non-finite step) print one line and exit
with status 1 (2 for a misspelled flag or config key).

The summary line at the end compares the mean reward of the first and the last 10% of the steps.

With several processes (--distributed), process 0 prepares the dataset and the warm start while
the others wait, then every process reads them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading

import jax
from absl import app, flags, logging

from kljax import cli, paths, rewards
from kljax.models import hf
from kljax.train import config as config_lib
from kljax.train import grpo, metrics, multihost, preempt, runlock
from kljax.train.checkpoint import CheckpointError, Checkpointer
from kljax.train.sft import initial_model

# configs/ is not installed: from elsewhere, the same defaults from the package
_DEFAULT_CONFIG = ("configs/grpo_tiny.py" if os.path.isfile(os.path.join("configs", "grpo_tiny.py"))
                   else config_lib.__file__)
_CONFIG = cli.define_config_file("config", _DEFAULT_CONFIG, "GRPO config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (metrics, checkpoints).")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() first (multi-host / multi-process).")
_COORDINATOR = flags.DEFINE_string(
    "coordinator", None, "host:port of process 0; omit on TPU pods and SLURM (auto-detected).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "With --coordinator.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "With --coordinator.")
_INIT_TIMEOUT = flags.DEFINE_integer(
    "init_timeout", 300, "With --distributed: seconds to wait for every process to connect.")
flags.mark_flag_as_required("workdir")


@contextlib.contextmanager
def _connect_watchdog(timeout_s: int):
  """While the processes wait for each other: a line after a few seconds, and one line ending the
  process if they have not all connected a second before `timeout_s` (JAX itself then aborts
  with a C++ stack dump, after 5 silent minutes by default)."""
  done = threading.Event()
  say_after = min(5.0, max(timeout_s - 1.0, 0.5) / 2)

  def watch():
    if done.wait(say_after):
      return
    print(f"kljax: --distributed: waiting up to {timeout_s} s for every process to connect "
          f"(--init_timeout).", file=sys.stderr, flush=True)
    if not done.wait(max(timeout_s - 1 - say_after, 0.5)):
      print(f"kljax: --distributed: not every process connected within {timeout_s} s "
            f"(--init_timeout): start all --num_processes processes, each with its own "
            f"--process_id and the same --coordinator (process 0's reachable HOST:PORT).",
            file=sys.stderr, flush=True)
      os._exit(1)

  threading.Thread(target=watch, daemon=True).start()
  try:
    yield
  finally:
    done.set()


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  if not _WORKDIR.value.strip():  # `--workdir=$RUN` with RUN unset: not the current directory
    raise app.UsageError("--workdir is empty (an unset shell variable?); name the run directory.")
  if _DISTRIBUTED.value:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU processes only
    explicit = {}
    if _COORDINATOR.value:
      explicit = dict(coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                      process_id=_PROCESS_ID.value)
    try:
      with _connect_watchdog(_INIT_TIMEOUT.value):
        jax.distributed.initialize(**explicit, initialization_timeout=_INIT_TIMEOUT.value)
    except ValueError as err:  # no coordinator given, and none to detect (not a TPU pod or SLURM)
      raise app.UsageError(
          f"--distributed: {err} This host is not a TPU pod or SLURM job, where it is detected: "
          f"pass --coordinator=HOST:PORT (process 0's address) --num_processes=N "
          f"--process_id=I to every process.") from None
  config = _CONFIG.value
  workdir = paths.resolve(_WORKDIR.value)
  leader = jax.process_index() == 0
  try:
    options = grpo.validate(config, workdir)  # once a launch: the stages read these options
    with multihost.leader_first("to prepare the dataset"):
      grpo.check_prompt_lengths(options)  # reads the dataset (preparing it on first use)
    changes = grpo.check_resume(options.config, workdir)  # before any work: one run, one config
  except (grpo.ConfigError, multihost.LeaderFailedError) as err:
    raise app.UsageError(str(err)) from None
  done = finished_step(options, workdir)
  if done is not None:
    if leader:
      print(f"run complete: {done} of {options.num_steps} steps done (checkpoint step {done} in "
            f"{workdir / 'checkpoints'}); nothing to do: raise --config.num_steps to continue it.")
      _print_summary(workdir)
    return
  try:
    with contextlib.ExitStack() as stack:
      with multihost.leader_first("to take the run lock"):
        if leader:
          stack.enter_context(runlock.hold(workdir))
          # what experiments.plot labels the run by (KL term, β) and a resume is checked against;
          # a resume that changed fields on purpose is recorded by `grpo.train`, which sees them
          if not changes:
            grpo.record_config(options.config, workdir, {})
      with multihost.leader_first("to make the warm start"):
        try:
          init_model = initial_model(options.config, workdir / "sft", checked=True)
        except hf.CheckpointError as err:  # e.g. non-finite weights, found as they are read
          raise grpo.ConfigError(f"--config.model.init: {err}") from None
      history = grpo.train(options, workdir, init_model=init_model)
  except (runlock.RunLockedError, CheckpointError, grpo.NonFiniteError, grpo.ConfigError,
          multihost.LeaderFailedError, rewards.RewardError) as err:
    print(f"{type(err).__name__}: {err}", file=sys.stderr)
    sys.exit(1)
  except preempt.Preempted as err:
    if leader:
      print(f"kljax: {err}", file=sys.stderr, flush=True)
    sys.exit(err.exit_status)
  except KeyboardInterrupt:  # Ctrl-C before the training loop (the warm start): nothing to save
    print("kljax: interrupted (SIGINT) before the first GRPO step; nothing to save.",
          file=sys.stderr, flush=True)
    sys.exit(128 + signal.SIGINT)
  if history and leader:
    _print_summary(workdir)


def finished_step(options: grpo.Options, workdir) -> int | None:
  """The newest checkpoint's step when it is at least `num_steps` (the run has nothing left to
  do), else None. Reads the checkpoint directory's listing only."""
  if not (workdir / "checkpoints").exists():
    return None
  ckpt = Checkpointer(workdir, every=options.checkpoint_every)
  try:
    step = ckpt.latest_step()
  finally:
    ckpt.close()
  return step if step is not None and step >= options.num_steps else None


def _print_summary(workdir) -> None:
  """The run's reward, first vs last 10% of its steps (all of metrics.jsonl, a resumed run's
  earlier steps included), and where its metrics are."""
  path = workdir / "metrics.jsonl"
  rows = metrics.read_jsonl(path) if path.exists() else []
  if rows:
    print(f"steps {rows[0]['step']}..{rows[-1]['step']}: {metrics.summary(rows)}; metrics in {path}")


def run() -> None:
  """The `kljax-grpo` console script (and `python -m experiments.grpo`): `main` under `cli.run`,
  whose --help shows this module's docstring and flags."""
  cli.run(main, doc=__doc__, flags_module=__name__)


if __name__ == "__main__":
  run()
