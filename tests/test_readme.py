"""The README's numbers come from the committed results: its generated blocks must match them."""

import os

import pytest

from experiments import readme

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme() -> str:
  with open(os.path.join(ROOT, "README.md")) as f:
    return f.read()


def test_readme_blocks_are_generated_from_the_committed_results():
  text, generated = _readme(), readme.contents()
  assert readme.stale_blocks(text, generated) == [], (
      "README.md quotes numbers that differ from experiments/results: run "
      "python -m experiments.readme")


def test_a_changed_number_is_found_and_rewritten():
  text, generated = _readme(), readme.contents()
  table = readme.block(text, "reproduce:bandit")
  assert "1.43e-04" in table  # the k1_as_loss distance every run gives (not the stale 1.2e-04)
  edited = text.replace(table, table.replace("1.43e-04", "1.2e-04"))
  assert readme.stale_blocks(edited, generated) == ["reproduce:bandit"]
  assert readme.stale_blocks(readme.replace_block(edited, "reproduce:bandit", table), generated) == []
  # text outside the markers is left alone
  assert readme.replace_block("a\n<!-- BEGIN x -->\nold\n<!-- END x -->\nb\n", "x", "new\n") == \
      "a\n<!-- BEGIN x -->\nnew\n<!-- END x -->\nb\n"
  with pytest.raises(ValueError, match="exactly one '<!-- BEGIN missing -->'"):
    readme.block(text, "missing")


def test_the_quoted_cost_is_the_stored_cost_of_the_runs():
  results = readme._load(readme.QUICK)
  assert f"{results['meta']['seconds'] / 60:.1f} minutes" in readme.block(_readme(),
                                                                        "reproduce:cost")
