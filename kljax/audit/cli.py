"""The command line: `kljax-audit` (console script) and `python -m kljax.audit`.

    kljax-audit MODULE:FUNCTION [--placement ...] [--expect reverse] [--json FILE]
    kljax-audit --term k3_as_loss+ratio
    kljax-audit --gallery

The generated documents (README.md's terms table, docs/kl_terms.md, docs/frameworks.md) are
written by `python -m experiments.audit_docs`, not by the library.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import os
import sys
import threading
import time
from typing import Callable, Sequence

from kljax.audit.gallery import gallery_table
from kljax.audit.implementations import (
    PENALTY_AT,
    AuditError,
    Implementation,
    implementation,
    signature_of,
)
from kljax.audit.report import (
    EXPECTATIONS,
    SETTING_KEYS,
    AuditReport,
    audit,
    disagreements,
    resolve_settings,
    to_json,
)
from kljax.audit.torch_bridge import from_torch
from kljax.exact import AGGREGATIONS


def _load(spec: str) -> Callable:
  """The function MODULE:FUNCTION names, imported from the current directory or PYTHONPATH."""
  module_name, sep, attr = spec.partition(":")
  if not sep or not module_name or not attr:
    raise AuditError(f"expected MODULE:FUNCTION (e.g. 'kljax:k3' or 'mykl:penalty'), got {spec!r}.")
  if os.getcwd() not in sys.path:
    sys.path.insert(0, os.getcwd())
  try:
    module = importlib.import_module(module_name)
  except Exception as e:
    raise AuditError(f"cannot import module {module_name!r} (searched the current directory and "
                     f"PYTHONPATH): {type(e).__name__}: {e}") from e
  obj = module
  for part in attr.split("."):
    if not hasattr(obj, part):
      public = sorted(n for n in dir(module) if not n.startswith("_"))
      raise AuditError(f"module {module_name!r} has no attribute {attr!r}; it has: "
                       f"{', '.join(public[:30])}.")
    obj = getattr(obj, part)
  if not callable(obj):
    raise AuditError(f"{spec} is a {type(obj).__name__}, not a function.")
  return obj


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      # the console script `kljax-audit` or `python -m kljax.audit`, as invoked
      prog=("kljax-audit" if os.path.basename(sys.argv[0]) == "kljax-audit"
            else "python -m kljax.audit"),
      description="Which divergence does a KL implementation's gradient descend? Exact audit.")
  p.add_argument("function", nargs="?", help="MODULE:FUNCTION, an elementwise fn(logp, ref_logp) "
                 "(or, with --signature sequence, fn(logp_t, ref_logp_t, old_logp_t, mask_t))")
  p.add_argument("--placement", choices=("loss", "reward"), default="loss",
                 help="loss: the code differentiates fn; reward: it subtracts β·sg(fn) from rewards")
  p.add_argument("--credit", choices=("token", "reward_to_go"), default="token",
                 help="for --placement reward: a token's own penalty, or the sum of later ones")
  p.add_argument("--penalty-at", choices=PENALTY_AT, default=None,
                 help="in-reward penalties (--placement reward, or an in-reward --term): computed "
                      "once at rollout from π_old and held over epochs (default, what verl and "
                      "kljax's trainer do), or recomputed at the current parameters")
  p.add_argument("--expect", choices=tuple(EXPECTATIONS),
                 help="exit 0 when the gradient follows this in every setting checked (all that "
                      "the report runs, or those of --setting), 1 otherwise, naming each setting "
                      "that disagrees; frozen_*: the frozen-prefix gradient (prefixes from π_θ; "
                      "_old: from π_old), which for one token is the divergence's own")
  p.add_argument("--setting", action="append", metavar="NAME",
                 help="with --expect: check this setting only (repeatable): "
                      + ", ".join(f"{k} ({v})" for k, v in SETTING_KEYS.items()))
  p.add_argument("--json", metavar="FILE", help="also write the report as JSON")
  p.add_argument("--signature", choices=("elementwise", "sequence"), default=None,
                 help="the function's signature (default: 4 positional parameters -> sequence)")
  p.add_argument("--torch", action="store_true", help="FUNCTION is a PyTorch function")
  p.add_argument("--term", help="audit a kljax term by name, e.g. k3_as_loss+ratio")
  p.add_argument("--aggregation", choices=AGGREGATIONS, default="sum")
  p.add_argument("--level", choices=("token", "sequence"), default="token")
  p.add_argument("--seeds", type=int, default=3, help="random policies per setting")
  p.add_argument("--gallery", action="store_true",
                 help="print the audited table of what other frameworks ship")
  p.add_argument("--timeout", type=float, default=0.0, metavar="SECONDS",
                 help="the most seconds one implementation's audit may take (0: no limit); one "
                      "that takes longer stops the audit with one line naming it, exit status 3")
  p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
  return p


def _implementation(args) -> Implementation:
  """The implementation the arguments name: --term, or MODULE:FUNCTION with its options."""
  if args.term:
    return implementation(args.term, penalty_at=args.penalty_at)
  obj = _load(args.function)
  signature = args.signature or signature_of(obj)
  if args.torch:
    obj = from_torch(obj, signature=signature)
  return implementation(obj, placement=args.placement, credit=args.credit, signature=signature,
                        penalty_at=args.penalty_at, name=args.function)


def _check_expectation(report: AuditReport, expected: str, checked) -> int:
  bad = disagreements(report, expected, checked)
  print(f"\n--expect {expected}: {'NO' if bad else 'yes'} ({len(checked) - len(bad)} of "
        f"{len(checked)} settings agree)")
  for name, verdict, want in bad:
    print(f"  {name}: the gradient {verdict}, not {want}")
  return 1 if bad else 0


def main(argv: Sequence[str] | None = None) -> int:
  """The command line `kljax-audit` / `python -m kljax.audit`: 0 on success (or an --expect that
  holds), 1 for an --expect that does not, 2 for a usage or audit error, TIMEOUT_STATUS past
  --timeout."""
  p = _parser()
  args = p.parse_args(argv)
  if not args.timeout >= 0:
    p.error(f"--timeout must be a number of seconds >= 0 (0: no limit), got {args.timeout}")
  each = functools.partial(_evaluating, timeout=args.timeout, quiet=args.quiet)
  progress = None if args.quiet else (lambda line: print(f"kljax.audit: {line}", file=sys.stderr,
                                                         flush=True))
  try:
    if args.gallery:
      print(gallery_table(each=each), end="")
      return 0
    checked = resolve_settings(args.setting)
    if args.setting and not args.expect:
      raise ValueError("--setting names the settings --expect checks; give --expect too.")
    if not (args.term or args.function):
      p.error("give MODULE:FUNCTION, --term NAME or --gallery")
    obj = _implementation(args)
    with each(args.term or args.function):
      report = audit(obj, aggregation=args.aggregation, level=args.level, seeds=args.seeds,
                     progress=progress)
  except (AuditError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(report.markdown(), end="")
  if args.json:
    with open(args.json, "w") as f:
      f.write(to_json(report))
  return _check_expectation(report, args.expect, checked) if args.expect else 0


TIMEOUT_STATUS = 3  # the command line's exit status when an implementation exceeds --timeout


@contextlib.contextmanager
def _evaluating(label: str, *, timeout: float, quiet: bool):
  """The command line around one implementation's audit: a progress line, and with `timeout` > 0
  a watchdog that, past it, prints one line naming `label` and ends the process with
  TIMEOUT_STATUS. A thread, not a signal: it stops a function blocked in native code too (a
  signal handler runs only once that returns)."""
  if not quiet:
    print(f"kljax.audit: evaluating {label}", file=sys.stderr, flush=True)
  start = time.monotonic()

  def expire():
    sys.stdout.flush()
    print(f"kljax.audit: {label}: timed out after {timeout:g} s (--timeout); stopping.",
          file=sys.stderr, flush=True)
    os._exit(TIMEOUT_STATUS)

  timer = threading.Timer(timeout, expire) if timeout > 0 else None
  if timer is not None:
    timer.daemon = True
    timer.start()
  try:
    yield
  finally:
    if timer is not None:
      timer.cancel()
  if not quiet:
    print(f"kljax.audit: {label}: done in {time.monotonic() - start:.1f} s", file=sys.stderr,
          flush=True)
