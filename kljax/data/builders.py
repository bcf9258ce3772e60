"""TFDS builders for the tasks, stored as array_record and read without TensorFlow.

  source = kljax.data.load("arithmetic/level2", "train", data_dir=DIR)   # prepares on first use
  source[i] -> {"question": str, "answer": str, ...}

`data_dir` and `manual_dir` may be local or URLs (gs://…). array_record reads and writes local
files only, so a remote `data_dir` is the shared store of prepared datasets and a local mirror
(`kljax.paths.mirror`) is what is read: a dataset found in the store is copied down; one that is
not is prepared locally and copied up, its `dataset_info.json` last, so that a dataset in the
store with that file is complete.

`kljax_arithmetic` (configs level1..level5) and `kljax_countdown` (n3, n4) are generated
procedurally from fixed seeds: the same version always holds the same examples, and train and
test use different seeds. `kljax_gsm8k` reads the official GSM8K JSONL files (downloaded when the
dataset is prepared, or taken from `manual_dir`), keeping the worked solution and the final answer
extracted from its `#### N` line. `kljax_openr1_math` reads OpenR1-Math-220k (the prompts of Liu et
al. 2025), keeping the problems with a numeric answer.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from kljax import paths
from kljax.data import tasks
from kljax.rewards import extract_answer, parse_number

_TEXT = tfds.features.Text


class DataError(ValueError):
  """Source data that cannot make a dataset (an empty file, bytes that are not UTF-8, a line that
  is not JSON or lacks a field), or a data directory it cannot be prepared in. The message names
  the file (and line); `field` is the config field at fault (`data.manual_dir`, `data.data_dir`)."""

  def __init__(self, msg: str, *, field: str = "data.manual_dir"):
    super().__init__(msg)
    self.field = field


# The fields of each dataset's examples (all stored as text) and the kind of value each holds; a
# reward fits a dataset whose fields it can read (`kljax.rewards.EXAMPLE_FIELDS`).
FIELDS = {
    "arithmetic": {"question": "text", "answer": "number", "level": "integer"},
    "countdown": {"question": "text", "answer": "expression", "numbers": "integers",
                  "target": "integer"},
    "gsm8k": {"question": "text", "solution": "text", "answer": "number"},
    "openr1_math": {"question": "text", "solution": "text", "answer": "number"},
}


def _features(dataset: str) -> tfds.features.FeaturesDict:
  return tfds.features.FeaturesDict({n: _TEXT() for n in FIELDS[dataset]})


class TaskConfig(tfds.core.BuilderConfig):
  def __init__(self, *, param: int, train_size: int, test_size: int, seed: int, **kwargs):
    super().__init__(**kwargs)
    self.param, self.train_size, self.test_size, self.seed = param, train_size, test_size, seed


class KljaxArithmetic(tfds.core.GeneratorBasedBuilder):
  """Multi-digit arithmetic, one config per difficulty level."""

  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIGS = [
      TaskConfig(name=f"level{lv}", param=lv, train_size=20_000, test_size=1_000, seed=1000 + lv,
                 description=f"operands of up to {lv} digits")
      for lv in tasks.ARITHMETIC_LEVELS
  ]

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=_features("arithmetic"))

  def _split_generators(self, dl_manager):
    c = self.builder_config
    return {"train": self._generate_examples(c.seed, c.train_size),
            "test": self._generate_examples(c.seed + 500_000, c.test_size)}

  def _generate_examples(self, seed, count):
    for i, ex in enumerate(tasks.arithmetic(seed, count, self.builder_config.param)):
      yield i, ex


class KljaxCountdown(tfds.core.GeneratorBasedBuilder):
  """Countdown: reach the target with the given numbers, each used at most once."""

  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIGS = [
      TaskConfig(name=f"n{k}", param=k, train_size=20_000, test_size=1_000, seed=2000 + k,
                 description=f"{k} numbers") for k in (3, 4)
  ]

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=_features("countdown"))

  def _split_generators(self, dl_manager):
    c = self.builder_config
    return {"train": self._generate_examples(c.seed, c.train_size),
            "test": self._generate_examples(c.seed + 500_000, c.test_size)}

  def _generate_examples(self, seed, count):
    for i, ex in enumerate(tasks.countdown(seed, count, self.builder_config.param)):
      yield i, ex


GSM8K_URLS = {
    "train": "https://raw.githubusercontent.com/openai/grade-school-math/master/grade_school_math/data/train.jsonl",
    "test": "https://raw.githubusercontent.com/openai/grade-school-math/master/grade_school_math/data/test.jsonl",
}


def gsm8k_final_answer(solution: str) -> str:
  """The final answer of a GSM8K solution, normalized ("1,234" -> "1234", "3.50" -> "7/2")."""
  value = parse_number(extract_answer(solution))
  if value is None:
    raise ValueError(f"no final answer in GSM8K solution {solution[-80:]!r}.")
  return str(value.numerator) if value.denominator == 1 else str(value)


class KljaxGsm8k(tfds.core.GeneratorBasedBuilder):
  """GSM8K (Cobbe et al., arXiv:2110.14168): question, worked solution, final answer."""

  VERSION = tfds.core.Version("1.0.0")
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Optional: put train.jsonl and test.jsonl from github.com/openai/grade-school-math "
      "(grade_school_math/data/) in the manual dir; otherwise they are downloaded.")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=_features("gsm8k"))

  def _split_generators(self, dl_manager):
    files = _gsm8k_manual_files(_manual(dl_manager))
    if not files:
      files = dl_manager.download(GSM8K_URLS)
    return {s: self._generate_examples(p) for s, p in files.items()}

  def _generate_examples(self, path):
    with epath.Path(path).open() as f:
      for i, line in enumerate(f):
        if line.strip():
          obj = json.loads(line)
          yield i, {"question": obj["question"], "solution": obj["answer"],
                    "answer": gsm8k_final_answer(obj["answer"])}


OPENR1_URLS = [
    "https://huggingface.co/datasets/open-r1/OpenR1-Math-220k/resolve/main/data/"
    f"train-{i:05d}-of-00010.parquet" for i in range(10)]


def _manual(dl_manager) -> epath.Path | None:
  """The manual directory (local or a URL), or None."""
  return paths.resolve(dl_manager.manual_dir) if dl_manager.manual_dir else None


def _gsm8k_manual_files(manual: epath.Path | None) -> dict[str, epath.Path]:
  """{split: file} when `manual` holds every split's JSONL file, else {} (they are downloaded)."""
  if manual and all((manual / f"{s}.jsonl").exists() for s in GSM8K_URLS):
    return {s: manual / f"{s}.jsonl" for s in GSM8K_URLS}
  return {}


def _openr1_manual_files(manual: epath.Path | None) -> list[epath.Path]:
  """The parquet and JSONL files of `manual`, sorted; [] when none (they are downloaded)."""
  if not manual or not manual.is_dir():
    return []
  return sorted(p for p in manual.iterdir() if p.name.endswith((".parquet", ".jsonl")))


# The fields every line of a manual JSONL file must hold, by dataset.
MANUAL_FIELDS = {"gsm8k": ("question", "answer"), "openr1_math": ("problem", "answer")}


def manual_files(name: str, manual_dir: str | None) -> list[epath.Path]:
  """The files of `manual_dir` that dataset `name` is prepared from ([]: it downloads its own)."""
  base = name.partition("/")[0]
  if not manual_dir or base not in MANUAL_FIELDS:
    return []
  manual = paths.resolve(manual_dir)
  if base == "gsm8k":
    return list(_gsm8k_manual_files(manual).values())
  return _openr1_manual_files(manual)


def check_manual(name: str, manual_dir: str | None) -> None:
  """Reads every JSONL file that dataset `name` would be prepared from in `manual_dir`, before any
  is prepared, and raises a DataError naming the file and line of the first fault: an empty file,
  a byte that is not UTF-8, a line that is not a JSON object, a missing field (`MANUAL_FIELDS`),
  a GSM8K solution without its `#### N` answer line. Parquet files are read by pyarrow as they
  are prepared."""
  base = name.partition("/")[0]
  for path in manual_files(name, manual_dir):
    if path.name.endswith(".jsonl"):
      _check_jsonl(path, MANUAL_FIELDS[base], gsm8k=base == "gsm8k")


def _check_jsonl(path: epath.Path, fields: tuple[str, ...], *, gsm8k: bool) -> None:
  rows = 0
  with path.open("rb") as f:
    for n, raw in enumerate(f, start=1):
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as err:
        raise DataError(f"{path}: line {n}: byte {raw[err.start:err.start + 1]!r} at column "
                        f"{err.start + 1} is not UTF-8; save the file as UTF-8.") from None
      if not line.strip():
        continue
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as err:
        raise DataError(f"{path}: line {n}: not JSON ({err.msg} at column {err.colno}).") from None
      if not isinstance(obj, dict):
        raise DataError(f"{path}: line {n}: a JSON {type(obj).__name__}, not an object with the "
                        f"fields {', '.join(fields)}.")
      for field in fields:
        if field not in obj:
          raise DataError(f"{path}: line {n}: no {field!r} field (it has "
                          f"{', '.join(map(repr, obj)) or 'none'}; each line needs "
                          f"{', '.join(map(repr, fields))}).")
      if gsm8k:
        try:
          gsm8k_final_answer(str(obj["answer"]))
        except ValueError as err:
          raise DataError(f"{path}: line {n}: field 'answer': {err}") from None
      rows += 1
  if not rows:
    raise DataError(f"{path}: no examples (the file is empty); each line needs a JSON object "
                    f"with {', '.join(map(repr, fields))}.")


def _openr1_rows(path: epath.Path):
  """(problem, solution, answer, uuid) rows of one OpenR1-Math parquet or JSONL file; parquet is
  read one row group at a time, and only these four columns (the files also hold long model
  generations)."""
  columns = ["problem", "solution", "answer", "uuid"]
  if path.name.endswith(".jsonl"):
    with path.open() as f:
      for line in f:
        if line.strip():
          obj = json.loads(line)
          yield tuple(obj.get(c) or "" for c in columns)
    return
  try:
    import pyarrow.parquet as pq
  except ImportError:
    raise ImportError("reading OpenR1-Math parquet files needs pyarrow: pip install "
                      "'kljax[openr1]' (or pyarrow), or convert them to JSONL.") from None
  with path.open("rb") as f:  # a seekable file object: pyarrow reads only what it needs
    reader = pq.ParquetFile(f)
    for g in range(reader.num_row_groups):
      table = reader.read_row_group(g, columns=columns).to_pydict()
      yield from zip(*(table[c] for c in columns))


class KljaxOpenr1Math(tfds.core.GeneratorBasedBuilder):
  """OpenR1-Math-220k (default subset) prompts with a numeric final answer: the paper's RL prompts.

  Only problems whose reference answer parses as a number are kept, so the exact numeric reward
  can verify them (answers such as intervals or expressions are dropped; their count is in the
  prepare log). The source has one split; `test` is a deterministic 2% of it, chosen by a hash of
  each problem's uuid.
  """

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {
      "1.1.0": "Answers parsed by the exact number grammar of kljax.rewards.parse_number: answers "
               "with inner spaces or '$', commas that do not separate thousands ('1,2', often a "
               "list), or non-ASCII digits are dropped instead of read as one number.",
      "1.0.0": "Initial release.",
  }
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Optional: put the train-*.parquet files of huggingface.co/datasets/open-r1/OpenR1-Math-220k "
      "(data/, the default subset) or JSONL files with problem/solution/answer/uuid fields in the "
      "manual dir; otherwise the parquet files (about 2 GB) are downloaded.")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=_features("openr1_math"))

  def _split_generators(self, dl_manager):
    files = _openr1_manual_files(_manual(dl_manager))
    if not files:
      files = [epath.Path(p) for p in dl_manager.download(OPENR1_URLS)]
    return {s: self._generate_examples(files, s) for s in ("train", "test")}

  def _generate_examples(self, files, split):
    import zlib

    for path in files:
      for i, (problem, solution, answer, uuid) in enumerate(_openr1_rows(path)):
        value = parse_number(answer)
        if value is None or not problem:
          continue
        key = uuid or f"{path.name}:{i}"
        if (zlib.crc32(key.encode()) % 50 == 0) != (split == "test"):
          continue
        yield key, {"question": problem, "solution": solution,
                    "answer": str(value.numerator) if value.denominator == 1 else str(value)}


DATASETS = {"arithmetic": "kljax_arithmetic", "countdown": "kljax_countdown", "gsm8k": "kljax_gsm8k",
            "openr1_math": "kljax_openr1_math"}


class Source:
  """Random access to a prepared split, with bytes decoded to str."""

  def __init__(self, data_source):
    self._source = data_source

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, str]:
    return _decode(self._source[int(index)])

  def take(self, indices) -> list[dict[str, str]]:
    """Many examples in one read: much faster than one at a time."""
    get_many = getattr(self._source, "__getitems__", None)
    rows = get_many([int(i) for i in indices]) if get_many else [self._source[int(i)] for i in indices]
    return [_decode(ex) for ex in rows]


def _decode(ex) -> dict[str, str]:
  return {k: v.decode() if isinstance(v, bytes) else str(v) for k, v in ex.items()}


def load(name: str, split: str, *, data_dir: str, manual_dir: str | None = None) -> Source:
  """A prepared split of "arithmetic/levelN", "countdown/nK", "gsm8k" or "openr1_math" (prepared on
  first use; the last two from `manual_dir` when it holds their files, else downloaded).

  A dataset prepared from `manual_dir` carries the size and mtime of its files
  (`source_fingerprint`, in `kljax_source.json`) and is prepared again when they change. Processes
  and runs preparing one data directory at once take turns (a file lock in it): the first
  prepares, the others wait and reuse its dataset.

  Raises ValueError naming the valid datasets, configs and splits for a bad request, and, before
  preparing, a DataError naming the file and line of a fault in `manual_dir`'s files
  (`check_manual`) or a data directory that cannot be written.
  """
  base, _, config = name.partition("/")
  if base not in DATASETS:
    raise ValueError(f"unknown dataset {name!r}; choose one of "
                     f"arithmetic/level1..level5, countdown/n3, countdown/n4, gsm8k, openr1_math.")
  cls = tfds.builder_cls(DATASETS[base])
  configs = [c.name for c in getattr(cls, "BUILDER_CONFIGS", [])]
  if configs and config not in configs:
    raise ValueError(f"dataset {base!r} needs a config, one of {', '.join(configs)} "
                     f"(e.g. '{base}/{configs[0]}'), got {config or 'none'!r}.")
  store = paths.resolve(data_dir)
  local = store if paths.is_local(store) else paths.mirror(store)
  kwargs: dict[str, Any] = {"data_dir": os.fspath(local), "file_format": "array_record"}
  if configs:
    kwargs["config"] = config
  builder = cls(**kwargs)
  version_dir = epath.Path(builder.data_dir)  # local/<name>/<config>/<version>
  remote = (store / os.fspath(version_dir)[len(os.fspath(local)):].lstrip("/")
            if local != store else None)
  source = source_fingerprint(name, manual_dir)
  if not _current(version_dir, source) or (remote is not None and not _current(remote, source)):
    with _preparing(local, name):
      _prepare(builder, version_dir, remote, source, name, manual_dir)
    builder = cls(**kwargs)  # reads the prepared dataset_info.json
  if split not in builder.info.splits:
    raise ValueError(f"{name} has splits {', '.join(builder.info.splits)}, not {split!r}.")
  return Source(builder.as_data_source(split=split))


_INFO = "dataset_info.json"
SOURCE_FILE = "kljax_source.json"  # beside dataset_info.json: the fingerprint of the manual files


def source_fingerprint(name: str, manual_dir: str | None) -> list | None:
  """[[file name, size, mtime], …] of the manual files dataset `name` is prepared from (mtime in
  ns for local files, s for remote ones), or None when it is generated or downloaded."""
  out = []
  for path in manual_files(name, manual_dir):
    if paths.is_local(path):
      st = os.stat(path)
      out.append([path.name, st.st_size, st.st_mtime_ns])
    else:
      st = path.stat()
      out.append([path.name, st.length, st.mtime])
  return out or None


def _current(version_dir: epath.Path, source: list | None) -> bool:
  """`version_dir` holds a prepared dataset, prepared from `source` when it has manual files."""
  if not (version_dir / _INFO).exists():
    return False
  if source is None:
    return True
  try:
    return json.loads((version_dir / SOURCE_FILE).read_text()) == source
  except (OSError, ValueError):
    return False


def _prepare(builder, version_dir, remote, source, name, manual_dir) -> None:
  """Under the data directory's lock: the local `version_dir` prepared from `source` (copied down
  from `remote` when the store has it, else prepared here, a stale copy removed first), then copied
  up to `remote` if the store lacks it (`dataset_info.json` last, so a reader that sees that file
  sees the whole dataset)."""
  if not _current(version_dir, source):
    if version_dir.exists():
      print(f"kljax: data: {version_dir} was prepared from other files than {manual_dir} holds "
            f"now; preparing {name} again.", file=sys.stderr, flush=True)
      shutil.rmtree(version_dir)
    if remote is not None and _current(remote, source):
      paths.copy_tree(remote, version_dir, last=(_INFO,))
    else:
      check_manual(name, manual_dir)
      builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
          manual_dir=os.fspath(paths.resolve(manual_dir)) if manual_dir else None))
      if source is not None:
        (version_dir / SOURCE_FILE).write_text(json.dumps(source))
  if remote is not None and not _current(remote, source):
    if (remote / _INFO).exists():  # a stale copy: unreadable until the new one is complete
      (remote / _INFO).unlink()
    paths.copy_tree(version_dir, remote, last=(_INFO,))


LOCK_FILE = ".kljax_prepare.lock"


@contextlib.contextmanager
def _preparing(local: epath.Path, name: str):
  """Holds the lock of the local data directory `local` (a file lock: every process and run that
  prepares there waits for the one preparing, then reuses its dataset). A directory that cannot
  be created or written is a DataError naming it."""
  import fcntl

  try:
    local.mkdir(parents=True, exist_ok=True)
    fd = os.open(local / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
  except OSError as err:
    raise DataError(f"{local}: {name} is not prepared there and cannot be ({err.strerror}): give "
                    f"a writable data directory, or one where it is prepared.",
                    field="data.data_dir") from None
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      print(f"kljax: data: waiting for another process preparing data in {local}.",
            file=sys.stderr, flush=True)
      fcntl.flock(fd, fcntl.LOCK_EX)
    yield
  finally:
    os.close(fd)  # releases the lock


def batch_indices(size: int, batch_size: int, step: int, *, seed: int) -> np.ndarray:
  """Indices of batch `step` of an endless stream of shuffled epochs (a new permutation per
  epoch, drawn from `seed` and the epoch number). A function of the step alone, so a resumed run
  continues exactly where it stopped."""
  if batch_size > size:
    raise ValueError(f"batch_size {batch_size} exceeds the dataset size {size}.")
  per_epoch = size // batch_size
  epoch, within = divmod(step, per_epoch)
  order = np.random.default_rng([seed, epoch]).permutation(size)
  return order[within * batch_size:(within + 1) * batch_size]
