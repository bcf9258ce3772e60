"""GRPO with the full-vocabulary KL terms (kljax.full_kl) through `kljax.train.grpo.train`: finite
metrics, the term's per-position KL logged, and the right direction wired (its value equals the
trainer's own exact-KL metric of the same policy on-policy)."""

import os
import sys

import numpy as np
import pytest

from kljax.train import grpo
from kljax.train.metrics import read_jsonl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_grpo import _init, tiny_config  # noqa: E402


def test_an_impossible_full_term_fails_before_compilation(data_dir):
  with pytest.raises(grpo.ConfigError, match="--config.kl.term: unknown KL term 'exact_fkl_rb'.*"
                                             "forward direction"):
    grpo.validate(tiny_config(data_dir, **{"kl.term": "exact_fkl_rb"}))


@pytest.mark.slow
@pytest.mark.parametrize("name,changes", [
    ("exact_rkl_as_loss", {}),
    ("exact_fkl_as_loss", {}),
    ("exact_rkl_rb", {}),
    ("top8_rkl_as_loss", {}),
    ("top8_rkl_rb", {}),
    ("exact_rkl_rb", {"loss.epochs": 2, "loss.minibatches": 2}),  # off-policy: cumulative ratio
])
def test_grpo_runs_with_full_terms(data_dir, sft_dir, tmp_path, name, changes):
  config = tiny_config(data_dir, **{"kl.term": name, "kl.beta": 0.1, "num_steps": 3,
                                    "optim.learning_rate": 3e-3, **changes})
  grpo.train(config, str(tmp_path), init_model=_init(sft_dir), progress=False)
  rows = read_jsonl(str(tmp_path / "metrics.jsonl"))
  assert [r["step"] for r in rows] == [0, 1, 2]
  for r in rows:
    assert all(np.isfinite(v) for v in r.values()), r
    assert r["kl_term_value"] >= -1e-6
  assert rows[0]["kl_term_value"] == pytest.approx(0.0, abs=1e-6)  # policy == reference
  assert rows[-1]["exact_rkl"] > 1e-5  # the policy moved: the comparisons below are not 0 = 0
  if not changes:  # on-policy: the update's KL_t is that of the rollout policy
    metric = "exact_fkl" if "fkl" in name else "exact_rkl"
    for r in rows[1:]:
      if name.startswith("exact"):
        assert r["kl_term_value"] == pytest.approx(r[metric], rel=1e-4, abs=1e-7)
      else:  # top-k + one tail draw a position: unbiased, noisy
        assert r["kl_term_value"] == pytest.approx(r[metric], rel=0.5)
