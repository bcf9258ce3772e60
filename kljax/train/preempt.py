"""Stopping on a signal without losing the steps since the last checkpoint.

SIGTERM is what a preemptible VM (GCE, TPU) and Kubernetes send before they take a machine away,
SIGHUP what a closed terminal sends, SIGINT what Ctrl-C sends. By default each ends the process at
once and every step since the last scheduled checkpoint is lost. Inside `on_signals` the first of
them only asks the trainer to stop: it finishes the step in progress (a step cannot be cut short
without throwing it away, and it is usually seconds), saves and verifies a checkpoint of it, flushes
the metrics and raises `Preempted`, whose `exit_status` is the shell's 128 + signal number.

The time that takes is bounded: the platform kills the process when its own grace period ends
(30 s on GCE and Kubernetes by default), so `grace_s` after the signal a watchdog ends the process
itself with one line saying that nothing was saved (the last scheduled checkpoint is then the newest)
rather than being killed mid-write. A second signal exits at once, the same way: the user asked twice.

Several processes (multi-host): a signal may reach some processes only, or reach them at different
steps, and a checkpoint needs every process. `agreed` is a collective that every process calls once a
step: the run stops after the first step at whose end any process has been asked to.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Iterator

import numpy as np

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class Preempted(Exception):
  """The run stopped on a signal after saving a checkpoint of its last completed step."""

  def __init__(self, message: str, signum: int):
    super().__init__(message)
    self.signum = signum
    self.exit_status = 128 + signum  # what a shell reports for a process a signal ended


class StopRequest:
  """What the signal handlers saw: `signum` is None until a first signal arrives."""

  def __init__(self):
    self.signum: int | None = None

  @property
  def name(self) -> str:
    return signal.Signals(self.signum).name if self.signum is not None else ""


def _exit_now(msg: str, signum: int) -> None:
  """One line on stderr, then the process ends at once: no cleanup may block, and background save
  threads may be stuck in a write that would never finish."""
  try:
    print(f"kljax: {msg}", file=sys.stderr, flush=True)
  finally:
    os._exit(128 + signum)


@contextlib.contextmanager
def on_signals(grace_s: float) -> Iterator[StopRequest]:
  """Within the block, SIGTERM, SIGINT and SIGHUP set the yielded request's `signum` instead of
  ending the process; `grace_s` seconds later (0: never) a watchdog ends it unsaved, and a second
  signal ends it at once. The previous handlers come back at the end. Off the main thread (where
  Python cannot install handlers) the block runs with the signals' usual effect."""
  request = StopRequest()
  if threading.current_thread() is not threading.main_thread():
    yield request
    return

  def handler(signum, frame):
    del frame
    name = signal.Signals(signum).name
    if request.signum is not None:
      _exit_now(f"second signal ({name}) while stopping after {request.name}: exiting at once, "
                f"without a checkpoint of the steps since the last one.", signum)
    request.signum = signum
    if grace_s > 0:
      timer = threading.Timer(grace_s, _exit_now, args=(
          f"{name}: the step in progress and its checkpoint did not finish within the grace "
          f"budget (stop_grace_s={grace_s:g}); exiting without saving them.", signum))
      timer.daemon = True
      timer.start()

  previous = {s: signal.signal(s, handler) for s in SIGNALS}
  try:
    yield request
  finally:
    for s, h in previous.items():
      signal.signal(s, h)


def agreed(request: StopRequest) -> int | None:
  """The signal to stop on now, on every process alike: this process's, else (several processes)
  another's; None to go on. A collective when there are several processes."""
  import jax

  if jax.process_count() == 1:
    return request.signum
  from jax.experimental import multihost_utils

  seen = multihost_utils.process_allgather(np.int32(request.signum or 0))
  stop = [int(s) for s in np.ravel(seen) if s]
  return request.signum or (stop[0] if stop else None)
