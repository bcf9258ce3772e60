"""What the test suite costs: runs the quickstart's test command and records its figures.

  python -m experiments.suite_cost            # runs `python -m pytest -q`, writes the JSON below
  python -m experiments.suite_cost --dry_run  # prints the recorded figures

Runs the suite as `.ci/run` does (after `pip install -e ".[test]"`), under `/usr/bin/time -v`, and
writes experiments/results/suite_cost.json: tests passed, pytest's own seconds, the peak resident
memory of the process tree's largest process, the CPU count and the date. The README's quickstart
quotes these (`python -m experiments.readme`, block `suite:cost`). A failing suite writes nothing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULT = os.path.join(REPO, "experiments", "results", "suite_cost.json")


def parse(pytest_out: str, time_out: str) -> dict:
  """The figures of one run: pytest's last summary line and GNU time's peak resident set."""
  summary = [line for line in pytest_out.splitlines() if re.search(r" in [0-9.]+s", line)][-1]
  passed = int(re.search(r"(\d+) passed", summary).group(1))
  seconds = float(re.search(r" in ([0-9.]+)s", summary).group(1))
  if re.search(r"\d+ (failed|error)", summary):
    raise SystemExit(f"the suite failed: {summary.strip()}")
  peak_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", time_out).group(1))
  return {"tests_passed": passed, "pytest_seconds": seconds, "peak_rss_gb": peak_kb / 2**20}


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--dry_run", action="store_true", help="print the recorded figures and exit")
  args = p.parse_args()
  if args.dry_run:
    with open(RESULT) as f:
      print(json.dumps(json.load(f), indent=1))
    return 0
  out = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-m", "pytest", "-q"], cwd=REPO,
                       capture_output=True, text=True)
  sys.stdout.write(out.stdout[-3000:])
  figures = parse(out.stdout, out.stderr) | {
      "cpus": os.cpu_count(), "date": datetime.date.today().isoformat(),
      "command": "python -m pytest -q"}
  with open(RESULT, "w") as f:
    json.dump(figures, f, indent=1)
    f.write("\n")
  print(f"wrote {RESULT}: {figures}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
