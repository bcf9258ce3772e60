"""The numbers of README.md and docs/ come from the committed results: their generated blocks
(experiments/readme.py, each in the file TARGETS names) must match them."""

import os

import pytest

from experiments import readme

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_generated_blocks_are_generated_from_the_committed_results():
  assert readme.stale_files() == [], (
      "README.md or docs/ quote numbers that differ from experiments/results and "
      "benchmarks/results: run python -m experiments.readme")


def test_every_block_is_in_its_file_once_and_nowhere_else():
  names = set(readme.TARGETS)
  files = ["README.md"] + [f"docs/{n}" for n in sorted(os.listdir(os.path.join(ROOT, "docs")))
                           if n.endswith(".md")]
  for path in files:
    text = readme.read(path)
    for name in names:
      count = text.count(f"<!-- BEGIN {name} -->\n")
      assert count == (1 if readme.TARGETS[name] == path else 0), (path, name, count)


def test_a_changed_number_is_found_and_rewritten():
  generated = readme.contents()
  path = readme.TARGETS["reproduce:bandit"]
  text = readme.read(path)
  table = readme.block(text, "reproduce:bandit")
  assert "1.43e-04" in table  # the k1_as_loss distance every run gives (not the stale 1.2e-04)
  edited = text.replace(table, table.replace("1.43e-04", "1.2e-04"))
  blocks = readme.by_file(generated)[path]
  assert readme.stale_blocks(edited, blocks) == ["reproduce:bandit"]
  assert readme.stale_blocks(readme.replace_block(edited, "reproduce:bandit", table), blocks) == []
  # text outside the markers is left alone
  assert readme.replace_block("a\n<!-- BEGIN x -->\nold\n<!-- END x -->\nb\n", "x", "new\n") == \
      "a\n<!-- BEGIN x -->\nnew\n<!-- END x -->\nb\n"
  with pytest.raises(ValueError, match="exactly one '<!-- BEGIN missing -->'"):
    readme.block(text, "missing")


def test_links_in_a_block_are_relative_to_its_file():
  assert readme.relink("[r](experiments/results/quick/report.md)", "README.md") == \
      "[r](experiments/results/quick/report.md)"
  assert readme.relink("[r](experiments/results/quick/report.md) ![f](benchmarks/a.png)",
                       "docs/reproduction.md") == \
      "[r](../experiments/results/quick/report.md) ![f](../benchmarks/a.png)"
  assert readme.relink("[k](docs/kl.md#numerics) [w](https://x.org/a) [a](#b)", "docs/x.md") == \
      "[k](kl.md#numerics) [w](https://x.org/a) [a](#b)"
  assert "](../experiments/results/quick/report.md)" in readme.contents()["reproduce:grpo"]


def test_the_quoted_cost_is_the_stored_cost_of_the_runs():
  results = readme._load(readme.QUICK)
  assert readme.TARGETS["reproduce:cost"] == "README.md"
  assert f"{results['meta']['seconds'] / 60:.1f} minutes" in readme.block(readme.read("README.md"),
                                                                        "reproduce:cost")
