"""One run per run directory: an OS file lock on WORKDIR/kljax.lock for the run's lifetime.

`fcntl.flock` locks belong to the open file, so the kernel releases them when the process exits
in any way, SIGKILL included; a stale lock file is harmless. The file holds the holder's host, pid
and start time, for the message a second run stops with. Within one process the lock is
re-entrant (the CLI holds it across the warm start and `train`, which takes it again).
Local filesystems only: flock is not reliable on every network filesystem.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
from typing import Iterator

LOCK_FILE = "kljax.lock"
_held: dict[str, list] = {}  # real path of a lock file -> [file, depth]: this process's locks


class RunLockedError(RuntimeError):
  """Another process holds the run directory."""


@contextlib.contextmanager
def hold(workdir: str) -> Iterator[str]:
  """Holds the lock of `workdir` (created if missing) for the `with` block; raises RunLockedError
  at once, naming the holder, if another process holds it. Yields the lock file's path."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.realpath(os.path.join(workdir, LOCK_FILE))
  if path in _held:
    _held[path][1] += 1
  else:
    f = open(path, "a+")
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
      f.seek(0)
      holder = f.read()
      f.close()
      if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        raise
      raise RunLockedError(f"--workdir {workdir} is in use by another run ({_describe(holder)}); "
                           f"wait for it to end or use another --workdir.") from None
    f.seek(0)
    f.truncate()
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    f.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "started": started}))
    f.flush()
    _held[path] = [f, 1]
  try:
    yield path
  finally:
    entry = _held[path]
    entry[1] -= 1
    if not entry[1]:
      del _held[path]
      entry[0].close()  # releases the lock; the file stays, its contents now stale


def _describe(holder: str) -> str:
  try:
    h = json.loads(holder)
    return f"host {h['host']}, pid {h['pid']}, started {h['started']}"
  except (ValueError, KeyError, TypeError):
    return "holder unknown: it has just started"
