"""One run per run directory: a lock on WORKDIR/kljax.lock for the run's lifetime.

Local WORKDIR: an OS file lock. `fcntl.flock` locks belong to the open file, so the kernel releases
them when the process exits in any way, SIGKILL included; a stale lock file is harmless. Local
filesystems only: flock is not reliable on every network filesystem.

Object store (WORKDIR = gs://…), which has no locks: a lease. The lock is an object holding the
holder's host, pid, start time, a token and when it was last renewed; the holder renews it every
`RENEW_S` seconds from a background thread and deletes it when the run ends. A run that starts
finds the lock held, and stops, while it was renewed within `LEASE_S` seconds, unless its holder
is a process of this host that no longer exists (a run killed here and started again goes on at
once). A run killed on another host leaves a lock that blocks the directory until it expires
(`LEASE_S`), or until someone deletes WORKDIR/kljax.lock. What this guarantees: a second run
started while the first is alive stops with a message naming it. What it does not: two runs
started within a second of each other can both proceed (an object store gives gcsfs no atomic
create), and a run whose renewals stop (a host cut off from the store for longer than `LEASE_S`)
can be taken over while it still runs; the newer run then holds it, and the older one says so.

The file holds the holder's host, pid and start time in both cases, for the message a second run
stops with. Within one process the lock is re-entrant (the CLI holds it across the warm start and
`train`, which takes it again).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import os
import socket
import sys
import threading
import time
import uuid
from typing import Iterator

from kljax import paths

LOCK_FILE = "kljax.lock"
RENEW_S = 30.0  # object stores: how often the holder renews its lease
LEASE_S = 120.0  # object stores: a lease not renewed for this long is free
SETTLE_S = 1.0  # object stores: wait before reading the lock back (a concurrent start wrote too?)
_held: dict[str, list] = {}  # lock path -> [release function, depth]: this process's locks


class RunLockedError(RuntimeError):
  """Another process holds the run directory."""


@contextlib.contextmanager
def hold(workdir: str | os.PathLike) -> Iterator[str]:
  """Holds the lock of `workdir` (created if missing) for the `with` block; raises RunLockedError
  at once, naming the holder, if another process holds it. Yields the lock file's path."""
  root = paths.resolve(workdir)
  if paths.is_local(root):
    root.mkdir(parents=True, exist_ok=True)
    path = os.path.realpath(root / LOCK_FILE)
  else:
    path = os.fspath(root / LOCK_FILE)
  if path in _held:
    _held[path][1] += 1
  else:
    release = _flock(path, workdir) if paths.is_local(root) else _lease(root / LOCK_FILE, workdir)
    _held[path] = [release, 1]
  try:
    yield path
  finally:
    entry = _held[path]
    entry[1] -= 1
    if not entry[1]:
      del _held[path]
      entry[0]()


def _holder() -> dict:
  started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
  return {"host": socket.gethostname(), "pid": os.getpid(), "started": started}


def _flock(path: str, workdir):
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
  f.write(json.dumps(_holder()))
  f.flush()
  return f.close  # releases the lock; the file stays, its contents now stale


def _lease(path, workdir):
  """Takes the lease object `path` (see the module docstring); returns its release function."""
  held = _read(path)
  if held is not None and _alive(held):
    raise RunLockedError(
        f"--workdir {workdir} is in use by another run ({_describe(json.dumps(held))}, lock "
        f"renewed {time.time() - held['renewed']:.0f} s ago); wait for it to end or use another "
        f"--workdir. If that run is dead, its lock expires {LEASE_S:.0f} s after its last "
        f"renewal, or delete {path}.")
  mine = {**_holder(), "token": uuid.uuid4().hex, "renewed": time.time()}
  paths.write_atomic(path, json.dumps(mine))
  time.sleep(SETTLE_S)
  now = _read(path)
  if now is None or now.get("token") != mine["token"]:
    raise RunLockedError(f"--workdir {workdir}: another run took its lock as this one started "
                         f"({_describe(json.dumps(now or {}))}); use another --workdir.")
  stop = threading.Event()

  def renew():
    while not stop.wait(RENEW_S):
      try:
        current = _read(path)
        if current is None or current.get("token") != mine["token"]:
          print(f"kljax: the lock {path} was taken over by another run "
                f"({_describe(json.dumps(current or {}))}): two runs now write {workdir}.",
                file=sys.stderr, flush=True)
          return
        paths.write_atomic(path, json.dumps({**mine, "renewed": time.time()}))
      except Exception as err:  # noqa: BLE001 - a network error; try again at the next renewal
        print(f"kljax: cannot renew the lock {path}: {err}", file=sys.stderr, flush=True)

  thread = threading.Thread(target=renew, name="kljax-runlock", daemon=True)
  thread.start()

  def release():
    stop.set()
    thread.join()
    with contextlib.suppress(Exception):  # released anyway when the lease expires
      current = _read(path)
      if current is not None and current.get("token") == mine["token"]:
        path.unlink()

  return release


def _read(path) -> dict | None:
  try:
    return json.loads(path.read_text())
  except FileNotFoundError:
    return None
  except ValueError:  # not JSON: not a lease kljax wrote; treat as held now, to be safe
    return {"renewed": time.time()}


def _alive(held: dict) -> bool:
  """Whether a lease read from the store still holds: renewed within LEASE_S, and its holder
  not a process of this host known to be gone."""
  if time.time() - held.get("renewed", 0) > LEASE_S:
    return False
  if held.get("host") == socket.gethostname() and isinstance(held.get("pid"), int):
    if held["pid"] == os.getpid():
      return True  # this process, not through `hold` (e.g. a lease left by a test)
    try:
      os.kill(held["pid"], 0)
    except ProcessLookupError:
      return False
    except PermissionError:
      return True
  return True


def _describe(holder: str) -> str:
  try:
    h = json.loads(holder)
    return f"host {h['host']}, pid {h['pid']}, started {h['started']}"
  except (ValueError, KeyError, TypeError):
    return "holder unknown: it has just started"
