"""Orbax checkpoints of a whole training state that verify what they restore.

Each checkpoint holds two items: `state` (the arrays) and `digest` (a CRC-32 of every array's
bytes, with its dtype and shape, and the step). Saves are asynchronous: `maybe_save` returns once
orbax has taken the arrays, and the write, the digest and the final rename run in the background
while training goes on. A save that fails in the background is reported at the next save, at
`wait` or at `close`, naming its step. The save reads the state's arrays in the background: a
caller that donates them (the trainer's update does) calls `wait` first; the trainer does so just
before its next update, so the write overlaps the next rollout without a copy of the state.

`restore` recomputes the digest of what it read and compares; a checkpoint that cannot be read or
does not match is moved to WORKDIR/rejected_checkpoints and the next older one is tried. The data
order and the random keys are functions of (seed, step), so the step is the whole of the data
position and RNG state, and it is covered by the digest like every other array.

WORKDIR may be a local directory or a URL (`gs://bucket/run`): orbax receives the URL unchanged,
and every process writes its shards and its digest to that one shared location and restores from
it. On an object store orbax marks a finished checkpoint with a `commit_success.txt` object
instead of renaming a temporary directory; a step without it is not a checkpoint (a save that was
stopped), and the next save of that step replaces it.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import errno
import gc
import json
import logging
import os
import shutil
import sys
import threading
import zlib
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from kljax import paths

_DIGEST_VERSION = 1


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be saved, or no checkpoint that can be restored into this run."""


class CheckpointSaveError(CheckpointError):
  """A save failed (out of space, or any write error); earlier checkpoints are untouched."""


class CheckpointMismatchError(CheckpointError):
  """A checkpoint that is intact but holds another state structure than the run's (written under
  another config: a model preset, rollout.staleness, an optimizer); nothing is moved."""


# ---------------------------------------------------------------- digests


def _leaf_digest(x) -> dict:
  """{dtype, shape, crc32} of a fully addressable array; {dtype, shape, shards: {index: crc32}} of
  the shards this process holds of one that is not (multi-process; replicas are one entry)."""
  def crc(a) -> int:
    return zlib.crc32(np.ascontiguousarray(a).reshape(-1).view(np.uint8))

  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    shards = {}
    for shard in x.addressable_shards:
      key = _index_key(shard.index, x.shape)
      if key not in shards:
        shards[key] = crc(np.asarray(shard.data))
    return {"dtype": str(x.dtype), "shape": list(x.shape), "shards": shards}
  a = np.asarray(x)
  return {"dtype": str(a.dtype), "shape": list(a.shape), "crc32": crc(a)}


def _index_key(index, shape) -> str:
  return ",".join(f"{s.start or 0}:{n if s.stop is None else s.stop}" for s, n in zip(index, shape))


def tree_digest(tree) -> dict[str, dict]:
  """{leaf path: digest} of every array of `tree`, in tree order. CRC-32 detects damage (flipped
  bits, torn or truncated files), not tampering. Host copies; the CRCs run on a few threads (zlib
  releases the GIL)."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  with concurrent.futures.ThreadPoolExecutor(min(4, os.cpu_count() or 1)) as pool:
    digests = list(pool.map(lambda kv: _leaf_digest(kv[1]), leaves))
  return {jax.tree_util.keystr(k, simple=True, separator="/"): d
          for (k, _), d in zip(leaves, digests)}


def _first_difference(saved: dict, restored: dict) -> str | None:
  """A sentence naming the first array whose restored digest differs from the saved one. Shards
  that were not recorded (a checkpoint restored onto another process layout) are not compared."""
  for path, got in restored.items():
    want = saved.get(path)
    if want is None:
      return f"array {path} has no recorded digest (a different state structure)"
    if (want["dtype"], want["shape"]) != (got["dtype"], got["shape"]):
      return (f"array {path} is {got['dtype']}{got['shape']}, recorded as "
              f"{want['dtype']}{want['shape']}")
    if "crc32" in got and want.get("crc32", got["crc32"]) != got["crc32"]:
      return f"array {path} differs from the digest recorded at save"
    for index, value in got.get("shards", {}).items():
      if want.get("shards", {}).get(index, value) != value:
        return f"array {path} (shard {index}) differs from the digest recorded at save"
  return None


def _structure_difference(saved: dict, target: dict) -> str | None:
  """A sentence naming the arrays that one of the saved digest (`saved`) and the target's
  {path: {dtype, shape}} has and the other lacks, or the first whose dtype or shape differs."""
  missing = [p for p in target if p not in saved]
  extra = [p for p in saved if p not in target]
  if missing or extra:
    parts = []
    if missing:
      parts.append(f"this run's state has {len(missing)} array(s) it lacks ({', '.join(missing[:3])}"
                   f"{', …' if len(missing) > 3 else ''})")
    if extra:
      parts.append(f"it has {len(extra)} array(s) this run's state lacks ({', '.join(extra[:3])}"
                   f"{', …' if len(extra) > 3 else ''})")
    return "; ".join(parts)
  for path, want in target.items():
    got = saved[path]
    if (got["dtype"], list(got["shape"])) != (want["dtype"], list(want["shape"])):
      return (f"array {path} is {got['dtype']}{list(got['shape'])} in it and "
              f"{want['dtype']}{list(want['shape'])} in this run")
  return None


def _abstract_digest(abstract) -> dict[str, dict]:
  """{leaf path: {dtype, shape}} of a tree of arrays or ShapeDtypeStructs, keyed as `tree_digest`."""
  leaves = jax.tree_util.tree_flatten_with_path(abstract)[0]
  return {jax.tree_util.keystr(k, simple=True, separator="/"):
          {"dtype": str(np.dtype(x.dtype)), "shape": list(x.shape)} for k, x in leaves}


class DigestHandler(ocp.AsyncCheckpointHandler):
  """The `digest` item: computed from the state and written in orbax's background commit, so the
  checkpoint and its digest are finalized together. Every process writes the digest of its own
  arrays (all of them single-process; its shards multi-process); restore merges them."""

  async def _write(self, directory: epath.Path, args: DigestSave) -> None:
    record = {"version": _DIGEST_VERSION, "step": args.step, "arrays": tree_digest(args.state)}
    (epath.Path(directory) / f"digest.{jax.process_index()}.json").write_text(json.dumps(record))

  async def async_save(self, directory, args: DigestSave):
    return [ocp.future.CommitFutureAwaitingContractedSignals(self._write(directory, args),
                                                             name="kljax_digest")]

  def save(self, directory, args: DigestSave):
    ocp.future.CommitFutureAwaitingContractedSignals(self._write(directory, args)).result()

  def restore(self, directory, args: DigestRestore | None = None) -> dict:
    del args
    files = sorted(epath.Path(directory).glob("digest.*.json"))
    if not files:
      raise FileNotFoundError(f"no digest in {directory}")
    merged: dict = {}
    for f in files:
      record = json.loads(f.read_text())
      arrays = merged.setdefault("arrays", {})
      for path, d in record.pop("arrays").items():
        if path in arrays and "shards" in d:
          arrays[path]["shards"].update(d["shards"])
        else:
          arrays[path] = d
      merged.update(record)
    return merged


@ocp.args.register_with_handler(DigestHandler, for_save=True)
@dataclasses.dataclass
class DigestSave(ocp.args.CheckpointArgs):
  state: Any  # read in the background: not to be donated or deleted before `wait` returns
  step: int


@ocp.args.register_with_handler(DigestHandler, for_restore=True)
@dataclasses.dataclass
class DigestRestore(ocp.args.CheckpointArgs):
  pass


# ---------------------------------------------------------------- the checkpointer


class Restored(NamedTuple):
  step: int
  state: Any
  rejected: list[tuple[int, str]]  # (step, why) of newer checkpoints that did not verify


class _Unverified(Exception):
  pass


class _Mismatched(Exception):
  pass


class _OrbaxSaveTracebacks(logging.Filter):
  """Drops orbax's own logged tracebacks: every error of a background save is raised again by
  `Checkpointer.wait` as one CheckpointSaveError, and the user needs one message, not five. The
  last one is kept, for a save that orbax gave up on without raising."""

  last: BaseException | None = None

  def filter(self, record: logging.LogRecord) -> bool:
    if (record.levelno >= logging.ERROR and record.exc_info
        and f"{os.sep}orbax{os.sep}" in record.pathname):
      _OrbaxSaveTracebacks.last = record.exc_info[1]
      return False
    return True


_a_save_failed = False  # set once a save failed in this process


def _orbax_unraisable(hook):
  """Wraps `sys.unraisablehook` to drop the echoes of a save that already failed: orbax write
  coroutines finalized after orbax closed their event loop, and TensorStore writes still in flight
  then, whose completion callbacks find the loop closed ('Event loop is closed')."""
  def quiet(unraisable):
    code = getattr(unraisable.object, "cr_code", None)
    if code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename:
      return
    tb = unraisable.exc_traceback
    if (_a_save_failed and unraisable.object is None and tb is not None
        and tb.tb_frame.f_code.co_name == "call_soon_threadsafe"
        and str(unraisable.exc_value) == "Event loop is closed"):
      return
    hook(unraisable)

  quiet.kljax_quiet = True
  return quiet


def _quiet_failed_saves() -> None:
  absl_logger = logging.getLogger("absl")
  if not any(isinstance(f, _OrbaxSaveTracebacks) for f in absl_logger.filters):
    absl_logger.addFilter(_OrbaxSaveTracebacks())
  if not getattr(sys.unraisablehook, "kljax_quiet", False):
    sys.unraisablehook = _orbax_unraisable(sys.unraisablehook)


def _release_stranded_save_threads(timeout_s: float = 5.0) -> None:
  """Ends orbax's background commit threads of a save that failed. Each waits for a signal that
  the failed save will never send (for orbax's own coordination timeout, many minutes), and they
  are not daemons: the interpreter would wait for them at exit, a process that printed its error
  and then hung. Cancelled and given their signal, they return without writing."""
  try:
    from orbax.checkpoint._src.futures import future as ocp_future

    threads = [t for t in threading.enumerate()
               if isinstance(t, ocp_future._SignalingThread) and t.is_alive()]  # noqa: SLF001
    for t in threads:
      t.cancel()
      ocp_future.set_signals(t._receive_signals, operation_id=t._operation_id)  # noqa: SLF001
  except (ImportError, AttributeError):  # another orbax: its threads are its own business
    return
  for t in threads:
    threading.Thread.join(t, timeout_s)


def _say(msg: str) -> None:
  if jax.process_index() == 0:
    print(f"kljax: {msg}", file=sys.stderr, flush=True)


class Checkpointer:
  """Saves every `every` steps into DIR/checkpoints (asynchronously), keeps the last `keep` (at
  least two, so that a damaged one has a predecessor), restores the newest that verifies."""

  def __init__(self, workdir: str | os.PathLike, *, every: int, keep: int = 2):
    if every < 1:
      raise ValueError(f"checkpoint_every must be >= 1, got {every}.")
    if keep < 2:
      raise ValueError(f"keep must be >= 2 (a damaged checkpoint needs a predecessor), got {keep}.")
    self.workdir = paths.resolve(workdir)  # a URL stays a URL
    self.directory = self.workdir / "checkpoints"
    self.every = every
    self._manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=True))
    _quiet_failed_saves()
    self._pending: int | None = None  # step of a save still writing in the background
    self._abstract = None  # the state's structure, to verify checkpoints in messages
    self._failed = False

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def maybe_save(self, step: int, state: Any, *, force: bool = False) -> bool:
    """Starts an asynchronous save of `state` as checkpoint `step` every `every` steps (or when
    forced). Raises CheckpointSaveError for this save or a failed earlier one."""
    # Not orbax's save_interval_steps/should_save: should_save lists the checkpoints folder before
    # the save's own error handling, so a folder replaced mid-run escaped as a traceback.
    if not force and step % self.every:
      return False
    self.wait()
    self._abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    try:
      self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), digest=DigestSave(state, step)), force=force)
    except Exception as err:  # noqa: BLE001 - orbax and the filesystem raise many types
      self._raise_save_error(step, err)
    self._pending = step
    return True

  def wait(self) -> None:
    """Blocks until a save in progress is on disk; raises CheckpointSaveError if it failed."""
    if self._pending is None:
      return
    step, self._pending = self._pending, None
    try:
      self._manager.wait_until_finished()
    except Exception as err:  # noqa: BLE001
      self._raise_save_error(step, err)
    if not self._finalized(step):  # orbax skipped its finalization
      self._raise_save_error(step, _OrbaxSaveTracebacks.last or RuntimeError(
          "orbax did not finalize it"))

  def _finalized(self, step: int) -> bool:
    """Whether checkpoint `step` was finished: renamed from its temporary directory (local), or
    marked by orbax's commit_success.txt (object stores, where a step directory exists from the
    save's first write)."""
    path = self.directory / str(step)
    return (path / "commit_success.txt").exists() if not paths.is_local(path) else path.exists()

  def _raise_save_error(self, step: int, err: BaseException):
    global _a_save_failed
    _a_save_failed = self._failed = True
    self._pending = None
    _release_stranded_save_threads()
    try:  # join orbax's threads and collect the rest of the failed save while Python is whole
      self._manager.close()
    except Exception:  # noqa: BLE001 - the error being reported
      pass
    gc.collect()
    local = paths.is_local(self.directory)
    gone = local and not self.directory.is_dir()
    try:
      free = (f"{shutil.disk_usage(self.directory if not gone else self.workdir).free / 2**20:.1f}"
              f" MiB free" if local else "an object store")
    except OSError:
      free = "free space unknown"
    # The failed manager re-raises the save's error from every later call: a new one, reading
    # which saves nothing, tells which earlier checkpoint verifies.
    good = None if gone else self._newest_verified_afresh()
    space = getattr(err, "errno", None) == errno.ENOSPC or "No space left" in str(err)
    fix = "free space (or fix the cause)" if space else "fix the cause"
    if gone:
      what = ("was deleted" if not self.directory.exists() else
              "is no longer a directory (a file is in its place)")
      last = (f"The checkpoints folder {what} during the run: its checkpoints are lost; restore "
              f"it, or move it aside and rerun the same command to start over.")
    elif good is not None:
      last = (f"The last checkpoint that verifies is step {good}; {fix} and rerun the same "
              f"command to resume from it.")
    else:
      last = f"No earlier checkpoint verifies; {fix} and rerun the same command to start over."
    raise CheckpointSaveError(
        f"cannot save checkpoint step {step} in {self.directory} ({free}): "
        f"{_cause(err)}. {last}") from None

  def _newest_verified_afresh(self) -> int | None:
    try:
      fresh = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(
          create=False, enable_async_checkpointing=False))
    except Exception:  # noqa: BLE001 - the folder is unreadable: nothing verifies
      return None
    failed, self._manager = self._manager, fresh
    try:
      return self.newest_verified()
    except Exception:  # noqa: BLE001
      return None
    finally:
      self._manager = failed
      try:
        fresh.close()
      except Exception:  # noqa: BLE001
        pass

  def _read(self, step: int, abstract) -> Any:
    """The state of checkpoint `step`, verified against its digest; _Unverified says why not."""
    problem, out = None, None
    digest_dir = self.directory / str(step) / "digest"
    if not digest_dir.exists():
      problem = "it has no digest (written by an older kljax, or damaged)"
    else:
      if abstract is not None:  # an intact checkpoint of another structure is not damaged
        try:
          saved = DigestHandler().restore(digest_dir)["arrays"]
        except Exception:  # noqa: BLE001 - an unreadable digest: the restore below says why
          saved = None
        differs = saved is not None and _structure_difference(saved, _abstract_digest(abstract))
        if differs:
          raise _Mismatched(differs)
      try:
        out = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), digest=DigestRestore()))
      except Exception as err:  # noqa: BLE001 - a torn or flipped data file raises many types
        problem = f"it cannot be read ({_cause(err)})"
    if out is not None:
      record = out["digest"]
      if record.get("step") != step:
        problem = f"its digest records step {record.get('step')}"
      else:
        problem = _first_difference(record["arrays"], tree_digest(out["state"]))
    if jax.process_count() > 1:  # every process decides alike (each checks its own shards)
      from jax.experimental import multihost_utils

      if not np.all(multihost_utils.process_allgather(np.int32(problem is None))):
        problem = problem or "an array differs on another process"
    if problem:
      raise _Unverified(problem)
    return out["state"]

  def newest_verified(self, target: Any = None) -> int | None:
    """The newest step whose checkpoint reads back and matches its digest (read-only)."""
    abstract = self._abstract if target is None else jax.tree.map(
        ocp.utils.to_shape_dtype_struct, target)
    if abstract is None:
      return None
    for step in sorted(self._manager.all_steps(), reverse=True):
      try:
        self._read(step, abstract)
        return step
      except (_Unverified, _Mismatched):
        continue
    return None

  def restore(self, target: Any = None) -> Restored | None:
    """The newest checkpoint that verifies, restored into `target`'s structure and shardings (or,
    without a target, as saved: nested dicts, single-process checkpoints only); None if there is
    none at all. Newer ones that do not verify are moved to WORKDIR/rejected_checkpoints, with a
    notice; if none verifies, raises CheckpointError."""
    self.wait()
    abstract = None
    if target is not None:
      abstract = self._abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    steps = sorted(self._manager.all_steps(), reverse=True)
    if not steps:
      return None
    rejected = []
    for step in steps:
      try:
        state = self._read(step, abstract)
      except _Mismatched as why:
        raise CheckpointMismatchError(
            f"checkpoint step {step} in {self.directory} is intact but holds another state than "
            f"this run's config builds: {why}. It was written under another configuration (e.g. "
            f"model.preset, rollout.staleness, the optimizer); nothing was moved. Resume with the "
            f"config it was written with (WORKDIR/config.json), or use a new --workdir.") from None
      except _Unverified as why:
        rejected.append((step, str(why)))
        _say(f"checkpoint step {step} in {self.directory} does not verify: {why}.")
        continue
      if rejected:
        moved = self._move_aside([s for s, _ in rejected])
        _say(f"resuming from checkpoint step {step}, the newest that verifies; moved "
             f"step(s) {', '.join(str(s) for s, _ in rejected)} to {moved}.")
      return Restored(step, state, rejected)
    raise CheckpointError(
        f"no checkpoint in {self.directory} verifies: "
        + "; ".join(f"step {s}: {why}" for s, why in rejected)
        + ". They were damaged, or written by a different configuration (model preset, "
        "optimizer). Nothing was moved. Copy intact checkpoints back if you have them; to start "
        "this run over from step 0, move the checkpoints directory aside or use a new --workdir.")

  def _move_aside(self, steps: list[int]) -> epath.Path:
    target = self.workdir / "rejected_checkpoints"
    if jax.process_index() == 0:
      for step in steps:
        dest, n = target / str(step), 1
        while dest.exists():
          dest, n = target / f"{step}.{n}", n + 1
        paths.move(self.directory / str(step), dest)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices("kljax_rejected_checkpoints")
    self._manager.reload()
    return target

  def close(self) -> None:
    """Waits for a save in progress (raising CheckpointSaveError if it failed) and closes."""
    try:
      self.wait()
    finally:
      try:
        self._manager.close()
      except Exception:  # noqa: BLE001 - already reported by wait()
        if not self._failed:
          raise


def _cause(err: BaseException) -> str:
  text = " ".join(str(err).split())
  if getattr(err, "errno", None) == errno.ENOSPC or "No space left on device" in text:
    text = f"no space left on device ({text})"
  return f"{type(err).__name__}: {text[:300]}{'…' if len(text) > 300 else ''}"
