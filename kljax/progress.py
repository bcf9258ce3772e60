"""Progress bars that suit where the output goes.

On a terminal, `bar` is `tqdm`. Anywhere else (CI, `nohup`, a log file, a pipe) a bar redrawn with
carriage returns would fill the log with one line per refresh, so `bar` is a `LogLines`: one
complete line every `interval` seconds or each `fraction` of the total, whichever comes first, and
one at the end, e.g.

  grpo: 150/300 step (50%) in 61 s, ~61 s left; reward=0.412, kl=0.0031
"""

from __future__ import annotations

import sys
import time
from typing import Any, Iterable

INTERVAL_S = 30.0
FRACTION = 0.1


def interactive(file=None) -> bool:
  """Whether `file` (default: stderr, where bars go) is a terminal."""
  file = sys.stderr if file is None else file
  try:
    return file.isatty()
  except (AttributeError, ValueError):  # no isatty, or closed
    return False


def bar(iterable: Iterable | None = None, **kwargs: Any):
  """`tqdm.auto.tqdm(iterable, **kwargs)` on a terminal, else `LogLines(iterable, **kwargs)`."""
  if interactive(kwargs.get("file")):
    from tqdm.auto import tqdm

    return tqdm(iterable, **kwargs)
  return LogLines(iterable, **kwargs)


class LogLines:
  """The part of tqdm's interface kljax uses (iteration, `update`, `set_postfix[_str]`,
  `set_description`, `close`, a context manager), written as plain log lines (see the module doc).

  Arguments tqdm takes that only concern drawing (`position`, `leave`, `dynamic_ncols`, …) are
  accepted and ignored."""

  def __init__(self, iterable: Iterable | None = None, *, desc: str = "", total: float | None = None,
               initial: float = 0, unit: str = "it", disable: bool = False, file=None,
               interval: float = INTERVAL_S, fraction: float = FRACTION, **_drawing: Any):
    if total is None and iterable is not None:
      try:
        total = len(iterable)  # type: ignore[arg-type]
      except TypeError:
        total = None
    self.iterable, self.desc, self.total, self.unit = iterable, desc, total, unit
    self.n = self._start = self._shown = initial
    self.disable, self.file = disable, file
    self.interval, self.fraction = interval, fraction
    self.postfix = ""
    self._t0 = self._last = time.monotonic()
    self._closed = False

  def __iter__(self):
    if self.iterable is None:
      raise TypeError("LogLines: no iterable to iterate over.")
    try:
      for item in self.iterable:
        yield item
        self.update(1)
    finally:
      self.close()

  def __len__(self) -> int:
    return int(self.total or 0)

  def __enter__(self):
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def update(self, n: float = 1) -> None:
    self.n += n
    now = time.monotonic()
    due = now - self._last >= self.interval
    if self.total:
      step = max(self.total * self.fraction, 1e-12)
      due = due or int(self.n / step) > int(self._shown / step)
    if due:
      self._print(now)

  def set_postfix(self, ordered_dict=None, refresh: bool = True, **kwargs: Any) -> None:
    del refresh
    items = dict(ordered_dict or {}) | kwargs
    self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

  def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
    del refresh
    self.postfix = str(s)

  def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
    del refresh
    self.desc = desc or ""

  def close(self) -> None:
    if not self._closed and self.n != self._shown:
      self._print(time.monotonic())
    self._closed = True

  def _print(self, now: float) -> None:
    self._last, self._shown = now, self.n
    if self.disable:
      return
    elapsed = now - self._t0
    done = f"{_num(self.n)}/{_num(self.total)}" if self.total else _num(self.n)
    line = f"{self.desc + ': ' if self.desc else ''}{done} {self.unit}"
    if self.total:
      line += f" ({100 * self.n / self.total:.0f}%)"
    line += f" in {elapsed:.0f} s"
    ran = self.n - self._start
    if self.total and 0 < ran and self.n < self.total:
      line += f", ~{elapsed / ran * (self.total - self.n):.0f} s left"
    if self.postfix:
      line += f"; {self.postfix}"
    file = sys.stderr if self.file is None else self.file
    print(line, file=file, flush=True)


def _num(x: float) -> str:
  return f"{x:g}" if isinstance(x, float) else str(x)
