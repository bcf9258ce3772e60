"""`python -m kljax.audit` with the coefficient c(log δ) drawn as a PNG.

  python -m experiments.audit kljax:k3 --placement loss --expect forward --setting token-on \\
      --plot c.png

Every argument but --plot goes to `kljax.audit` unchanged (its report is printed, its exit status
returned); --plot PNG draws the measured on-policy coefficient against log π − log π_ref (∇RKL) and
1 − δ (∇FKL). The library itself draws nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

from experiments import figures
from kljax import audit


def main(argv: list[str]) -> int:
  p = argparse.ArgumentParser(prog="python -m experiments.audit", add_help=False)
  p.add_argument("--plot", metavar="PNG", required=True,
                 help="plot the coefficient c(log δ) to this file")
  p.add_argument("--json", metavar="FILE", help="also write the report as JSON")
  args, rest = p.parse_known_args(argv)
  with tempfile.TemporaryDirectory() as tmp:
    path = args.json or os.path.join(tmp, "report.json")
    code = audit.main([*rest, "--json", path])
    if not os.path.exists(path):  # a usage error: kljax.audit said why
      return code
    with open(path) as f:
      figures.coefficient(json.load(f), args.plot)
  return code


if __name__ == "__main__":
  raise SystemExit(main(sys.argv[1:]))
