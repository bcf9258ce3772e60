"""Command lines that explain themselves, for the absl entry points under experiments/.

`run(main)` replaces `absl.app.run(main)`:

* `--help` (`-h`, `--helpshort`, `--helpfull`) prints the module's docstring, its flags with their
  defaults, and, for an entry point with a config flag, every config field with its value in the
  chosen config file and its one-line meaning (the trailing comment of the field in
  kljax/train/config.py), then exits 0.
* A misspelled flag or config key (`--config.kl.bta=0.1`) is one line on stderr naming it and the
  closest valid one, exit status 2, no traceback.
* A `UsageError` that `main` raises (a config that cannot run) is one line too, not absl's whole
  usage text, with the error's exit status.
* absl's log stays at WARNING unless `--verbosity` is given: absl raises it to INFO once flags are
  parsed, which lets TFDS's "Load dataset info", JAX's "Unable to initialize backend 'tpu'" and
  orbax's per-save notes through.
"""

from __future__ import annotations

import difflib
import functools
import importlib.util
import os
import sys
import tokenize
from typing import Callable

from kljax.train import config as config_module

HELP_ARGS = ("--help", "-h", "-?", "--helpshort", "--helpfull")
USAGE_ERROR = 2  # the status of a command line that cannot run (argparse's convention)


@functools.lru_cache(maxsize=None)
def field_docs(path: str | None = None) -> dict[str, str]:
  """{"kl.beta": "KL coefficient β …", …}: each `c.<field> = <default>  # <meaning>` line (any name
  for `c`) of the GRPO defaults' source (kljax/train/config.py) or of `path`, the trailing comment
  being the field's one-line meaning."""
  if path is None:
    path = config_module.__file__
  docs = {}
  with open(path, encoding="utf-8") as f:
    tokens = list(tokenize.generate_tokens(f.readline))
  line: list[tokenize.TokenInfo] = []
  for tok in tokens:
    if tok.type in (tokenize.NEWLINE, tokenize.NL):
      line = []
      continue
    if tok.type == tokenize.COMMENT and line:
      field = _assigned_field(line)
      if field is not None:
        docs[field] = tok.string.lstrip("#").strip()
      continue
    line.append(tok)
  return docs


def _assigned_field(line: list[tokenize.TokenInfo]) -> str | None:
  """"kl.beta" for the tokens of `c.kl.beta = 0.05`; None for any other line."""
  names = [t.string for t in line if t.type != tokenize.INDENT and t.type != tokenize.DEDENT]
  if "=" not in names:
    return None
  target = names[:names.index("=")]
  if len(target) < 3 or not target[0].isidentifier() or target[1] != ".":
    return None
  parts = "".join(target[2:]).split(".")
  return ".".join(parts) if all(p.isidentifier() for p in parts) else None


def flatten(config) -> dict[str, object]:
  """{"kl.beta": 0.05, …}: every leaf of a ConfigDict (or dict) under its dotted path."""
  out = {}
  for key, value in config.items():
    if hasattr(value, "items"):
      out |= {f"{key}.{k}": v for k, v in flatten(value).items()}
    else:
      out[key] = value
  return out


def describe_config(config, *, docs: dict[str, str] | None = None) -> str:
  """One line a field, in the order of kljax/train/config.py (then any others, sorted):
  `  kl.beta                  0.05          KL coefficient β …`."""
  docs = field_docs() if docs is None else docs
  order = {k: i for i, k in enumerate(docs)}
  leaves = flatten(config)
  leaves = dict(sorted(leaves.items(), key=lambda kv: (order.get(kv[0], len(order)), kv[0])))
  width = max(map(len, leaves)) + 2
  shown = {k: repr(v) for k, v in leaves.items()}
  vwidth = min(max(map(len, shown.values())) + 2, 24)
  lines = []
  for key, value in leaves.items():
    meaning = docs.get(key, "")
    value = shown[key] if len(shown[key]) <= 60 else shown[key][:57] + "…"
    lines.append(f"  {key:<{width}}{value:<{vwidth - 2}}  {meaning}".rstrip())
  return "\n".join(lines)


def closest(key: str, valid) -> str | None:
  """The valid key most like `key` (difflib), or None when nothing is close."""
  found = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
  return found[0] if found else None


def load_config(spec: str):
  """The ConfigDict of a config file as `--config` names it: "path.py" or "path.py:arg" (the
  argument is passed to `get_config`)."""
  path, _, arg = spec.partition(":")
  path = os.path.expanduser(path)
  if not os.path.isfile(path):
    raise ValueError(f"--config: {path} is not a file.")
  module_spec = importlib.util.spec_from_file_location("_kljax_cli_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def _config_spec(argv: list[str], name: str, default: str) -> str:
  """The value of `--<name>` in argv (the last one given), or `default`."""
  spec = default
  for i, arg in enumerate(argv):
    if arg.startswith(f"--{name}="):
      spec = arg.split("=", 1)[1]
    elif arg == f"--{name}" and i + 1 < len(argv):
      spec = argv[i + 1]
  return spec


def _override_keys(argv: list[str], name: str) -> list[str]:
  """The dotted keys of `--<name>.<key>[=value]` overrides in argv."""
  keys = []
  for arg in argv:
    if arg.startswith(f"--{name}."):
      keys.append(arg[len(name) + 3:].split("=", 1)[0])
  return keys


def fail(prog: str, message: str) -> None:
  """Prints `prog: message` as one line on stderr and exits with USAGE_ERROR."""
  print(f"{prog}: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
  sys.exit(USAGE_ERROR)


def _prog(argv: list[str]) -> str:
  main = sys.modules.get("__main__")
  spec = getattr(main, "__spec__", None)
  return f"python -m {spec.name}" if spec is not None and spec.name else os.path.basename(argv[0])


def define_config_file(name: str, default: str, help_string: str, *, docs: str | None = None):
  """`ml_collections.config_flags.DEFINE_config_file`, with the command line's `--<name>.KEY=VALUE`
  overrides checked first: config_flags applies them while the flag is defined (at import, when
  `--<name>` is not given), and a misspelled KEY would be a traceback there. `run` lists this
  config's fields in `--help`, with the meanings `field_docs(docs)` reads (default: the GRPO
  defaults, kljax/train/config.py)."""
  from absl import flags
  from ml_collections import config_flags

  _CONFIG_FLAGS[name] = (default, docs)
  argv = sys.argv[1:]
  keys = _override_keys(argv, name)
  if keys and not any(a in HELP_ARGS for a in argv):
    prog = _prog(sys.argv)
    config = _load_or_fail(prog, name, _config_spec(argv, name, default))
    valid = flatten(config)
    for key in keys:
      if key not in valid and not any(v.startswith(key + ".") for v in valid):
        near = closest(key, valid)
        fail(prog, f"--{name}.{key}: no such config field"
             + (f"; did you mean --{name}.{near}?" if near else
                f"; see {prog} --help for the fields."))
  holder = config_flags.DEFINE_config_file(name, default, help_string)
  caller = sys._getframe(1).f_globals.get("__name__", "")
  # absl lists a flag under the module that defined it: here, the caller's (as absl names __main__).
  flags.FLAGS.register_key_flag_for_module(sys.argv[0] if caller == "__main__" else caller,
                                           flags.FLAGS[name])
  return holder


# name -> (default config file, source of the fields' meanings) of define_config_file's flags
_CONFIG_FLAGS: dict[str, tuple[str, str | None]] = {}


def _load_or_fail(prog: str, name: str, spec: str):
  try:
    return load_config(spec)
  except ValueError as err:
    fail(prog, err)
  except Exception as err:  # noqa: BLE001 - a config file may raise anything; say which file
    fail(prog, f"--{name}: {spec} raised {type(err).__name__}: {err}")


def parse(argv: list[str]) -> list[str]:
  """absl's flag parsing (an `app.run` flags_parser) with the help and errors of this module."""
  from absl import flags

  prog = _prog(argv)
  fv = flags.FLAGS
  if any(a in HELP_ARGS or a.startswith("--help=") for a in argv[1:]):
    configs = {name: (_load_or_fail(prog, name, _config_spec(argv[1:], name, default)), docs)
               for name, (default, docs) in _CONFIG_FLAGS.items() if name in fv}
    print(usage(fv, configs=configs, full="--helpfull" in argv[1:]))
    sys.exit(0)
  try:
    return fv(argv)
  except flags.Error as err:
    fail(prog, f"{err} (see {prog} --help)")
  except Exception as err:  # noqa: BLE001 - config_flags raises its parsers' own errors
    fail(prog, f"{type(err).__name__}: {err}")


def usage(fv, *, configs: dict | None = None, full: bool = False) -> str:
  """The help text: the main module's docstring (or `run`'s `doc`), its flags, and the fields of
  `configs` ({flag name: (ConfigDict, source of the meanings or None for
  kljax/train/config.py)})."""
  main = sys.modules.get("__main__")
  parts = [(_DOC[0] if _DOC else getattr(main, "__doc__", None) or "").strip()]
  parts.append("flags:\n" + (fv.get_help() if full else fv.main_module_help()).strip("\n"))
  for name, (config, docs) in (configs or {}).items():
    source = os.path.relpath(docs) if docs else "kljax/train/config.py"
    parts.append(f"config fields (override any with --{name}.FIELD=VALUE; values of the chosen "
                 f"--{name} file, meanings from {source}):\n"
                 + describe_config(config, docs=field_docs(docs)))
  return "\n\n".join(p for p in parts if p)


_DOC: list[str] = []  # the help's docstring, when `run` is given one


def run(main: Callable[[list[str]], object], *, doc: str | None = None,
        flags_module: str | None = None) -> None:
  """`absl.app.run(main)` with `parse` as the flags parser, one-line usage errors and absl's log at
  WARNING (see the module doc). An entry point defined in a module of the package (a console
  script's, which `__main__` only imports) passes its docstring as `doc` and its module's name as
  `flags_module`, so that --help shows them as it would the main module's."""
  from absl import app, flags, logging

  if doc is not None:
    _DOC[:] = [doc]
  if flags_module is not None:
    for flag in flags.FLAGS.get_key_flags_for_module(flags_module):
      flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)

  def parser(argv):
    rest = parse(argv)
    if flags.FLAGS["verbosity"].using_default_value:  # absl raises it to INFO after this returns
      app.call_after_init(lambda: logging.set_verbosity(logging.WARNING))
    return rest

  def main_one_line_errors(argv):
    try:
      return main(argv)
    except app.UsageError as err:
      print(f"{_prog(argv)}: {' '.join(str(err).split())}", file=sys.stderr, flush=True)
      sys.exit(err.exitcode)

  app.run(main_one_line_errors, flags_parser=parser)
