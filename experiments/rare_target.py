"""A GRPO reward whose best completion the reference almost never writes: the stressing regime of
claim 3 (configs/grpo_stress.py).

The reward is the fraction of `TARGET`'s characters a completion matches position by position, so
partial answers already score (a dense signal a small model can climb) while the full target, "7777"
after an arithmetic prompt, has log π_ref ≈ −14 nats under the stress config's 30-step warm start
(the reproduction's report measures it: `experiments.reproduce.running.stress_target`). A policy
that learns it sits where
δ = π_ref/π → 0: k3's per-token coefficient 1 − δ saturates at 1 while the reverse KL's log(π/π_ref)
keeps growing, the regime in which Liu et al. (arXiv:2510.01555) expect k3 as a loss to regularize
less than k2.
"""

from __future__ import annotations

from typing import Sequence

TARGET = "7777"


def target_match(prompts: Sequence[str], completions: Sequence[str], **_) -> list[float]:
  """Per completion: the fraction of positions i < len(TARGET) with completion[i] == TARGET[i]."""
  return [sum(c[i:i + 1] == t for i, t in enumerate(TARGET)) / len(TARGET) for c in completions]
