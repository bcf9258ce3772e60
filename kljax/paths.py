"""Run paths: local directories and object-store URLs (`gs://…`, `s3://…`) as one type.

Every path kljax reads or writes for a run (`--workdir`, `data.data_dir`, `data.manual_dir`,
`model.init`, `model.tokenizer`, warm-start and reproduction outputs) goes through `resolve`, which
returns an `etils.epath.Path`: a local path (with `~` expanded, made absolute) or the URL unchanged.
`epath` reaches `gs://` through `gcsfs` (`pip install 'kljax[gcs]'`), `s3://` through `s3fs`;
orbax's checkpoints reach them through TensorStore, which needs no extra package.

Object stores have no appends, renames or directories: an object is written whole, at once, and a
"directory" exists while some object lies under it. What kljax writes there is written that way
(`write_atomic`, `MetricsWriter`), and what the array_record datasets need as local files is
mirrored (`mirror`).
"""

from __future__ import annotations

import importlib
import io
import os
import shutil
from typing import Iterator

from etils import epath

# scheme -> (the package epath reaches it through, how to install it)
REMOTE_PACKAGES = {
    "gs": ("gcsfs", "pip install 'kljax[gcs]'"),
    "s3": ("s3fs", "pip install s3fs"),
    "az": ("adlfs", "pip install adlfs"),
    "hf": ("huggingface_hub", "pip install huggingface_hub"),
}
CACHE_ENV = "KLJAX_CACHE"  # root of kljax's local caches; default ~/.cache/kljax


class PathError(ValueError):
  """A path kljax cannot reach: an unknown scheme, or the package for its scheme is missing."""


def scheme(path: str | os.PathLike) -> str | None:
  """"gs" for "gs://bucket/run"; None for a local path."""
  head, sep, _ = os.fspath(path).partition("://")
  return head if sep and head.isalnum() else None


def is_local(path: str | os.PathLike) -> bool:
  return scheme(path) is None


def resolve(path: str | os.PathLike) -> epath.Path:
  """`path` as an `epath.Path`: local ones with `~` expanded and made absolute (orbax needs
  absolute paths), URLs unchanged."""
  if is_local(path):
    return epath.Path(path).expanduser().resolve()  # epath's resolve is abspath: no symlinks
  return epath.Path(os.fspath(path))


def bucket(url: str | os.PathLike) -> epath.Path:
  """The bucket of a URL: gs://bkt for gs://bkt/runs/a."""
  s = scheme(url)
  return epath.Path(f"{s}://" + os.fspath(url)[len(s) + 3:].split("/", 1)[0])


def check_reachable(path: str | os.PathLike, *, flag: str) -> None:
  """Raises PathError naming `flag`, the package and the command that installs it, when `path`
  is a URL whose scheme kljax cannot reach here. Imports nothing heavy for local paths."""
  s = scheme(path)
  if s is None:
    return
  if s not in REMOTE_PACKAGES:
    raise PathError(f"{flag}: {path}: the scheme {s}:// is not supported (supported: local paths, "
                    f"{', '.join(f'{k}://' for k in REMOTE_PACKAGES)}).")
  package, install = REMOTE_PACKAGES[s]
  for module in ("fsspec", package):
    try:
      importlib.import_module(module)
    except ImportError:
      raise PathError(f"{flag}: {path}: reaching {s}:// paths needs the package {module}, which "
                      f"is not installed: {install}") from None


def write_atomic(path: epath.Path, data: str | bytes) -> None:
  """Replaces the file at `path` whole: readers see the old content or the new, never a part.
  Locally through a temporary file, fsync and a rename; on an object store one object write is
  already atomic."""
  raw = data.encode() if isinstance(data, str) else data
  if not is_local(path):
    path.write_bytes(raw)
    return
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + ".tmp")
  with open(tmp, "wb") as f:
    f.write(raw)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def files_under(root: epath.Path) -> Iterator[tuple[str, epath.Path]]:
  """(relative path, path) of every file below `root`, in sorted order."""
  base = os.fspath(root)
  base = base if is_local(base) else base[len(scheme(base)) + 3:]  # fsspec walks without scheme
  found = []
  for parent, _, files in root.walk():
    sub = os.fspath(parent)
    sub = sub[len(scheme(sub)) + 3:] if not is_local(sub) else sub
    for name in files:
      rel = f"{sub[len(base):].strip('/')}/{name}".lstrip("/")
      found.append((rel, root / rel))
  yield from sorted(found)


def copy_tree(src: epath.Path, dst: epath.Path, *, last: tuple[str, ...] = ()) -> None:
  """Copies every file below `src` to `dst` (either may be remote), the files named in `last`
  after all others: readers that wait for those see a complete copy."""
  files = list(files_under(src))
  files.sort(key=lambda item: os.path.basename(item[0]) in last)
  for rel, p in files:
    target = dst / rel
    if is_local(target):
      target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(p.read_bytes())


def move(src: epath.Path, dst: epath.Path) -> None:
  """Moves the directory `src` to `dst` (same filesystem or store). On an object store each
  object is copied, then the source removed: a stop in between leaves both, never neither."""
  if is_local(src):
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(os.fspath(src), os.fspath(dst))
    return
  copy_tree(src, dst)
  src.rmtree()


def mirror(url: epath.Path) -> epath.Path:
  """The local directory that mirrors the remote `url`: $KLJAX_CACHE/mirror/<scheme>/<path>
  (default ~/.cache/kljax). For what must be local files (array_record datasets)."""
  s = scheme(url)
  root = os.environ.get(CACHE_ENV) or os.path.join("~", ".cache", "kljax")
  return epath.Path(root).expanduser().resolve() / "mirror" / s / os.fspath(url)[len(s) + 3:]


def save_figure(fig, path: str | os.PathLike, *, dpi: int = 100) -> None:
  """`fig.savefig` as PNG to a local path or a URL (the bytes written whole)."""
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=dpi)
  write_atomic(resolve(path), buf.getvalue())

