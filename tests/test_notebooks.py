"""Every notebook executes top to bottom in its smallest setting (CI runs them; a broken notebook
fails the build), displays its plots, and shows what it claims."""

import os
import pathlib
import sys

import nbformat
import pytest
from nbclient import NotebookClient

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_grpo import child_xla_flags  # noqa: E402

NOTEBOOKS = sorted((pathlib.Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


def _stream_text(nb) -> str:
  return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                 for o in c.get("outputs", []) if o.get("output_type") == "stream")


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_executes(path, tmp_path, monkeypatch):
  nb = nbformat.read(path, as_version=4)
  # the kernel runs on the plain 1-device CPU, with the suite's other XLA flags (tests/conftest.py)
  monkeypatch.setenv("XLA_FLAGS", child_xla_flags())
  monkeypatch.setenv("KLJAX_NOTEBOOK_SMALL", "1")
  monkeypatch.setenv("KLJAX_NOTEBOOK_WORKDIR", str(tmp_path / "work"))
  NotebookClient(nb, timeout=600, kernel_name="python3",
                 resources={"metadata": {"path": str(tmp_path)}}).execute()
  errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if o.get("output_type") == "error"]
  assert not errors
  images = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if "image/png" in o.get("data", {})]
  assert images, "the notebook should display its plots"
  if path.name == "grpo_colab.ipynb":
    # Thm 5.1 in practice: with identical seeds, k2_as_loss and k1_in_reward sample the same
    # batch at every step of the small setting (their gradients agree to float rounding).
    assert "seed 0: identical batches for 6 of 6 steps" in _stream_text(nb)
