"""GRPO with any KL term: `python -m experiments.grpo`, the same command as the `kljax-grpo`
console script (kljax/cli_grpo.py holds it, so that it is installed with the package).

  python -m experiments.grpo --config configs/grpo_tiny.py --workdir DIR [--config.kl.term=...]
"""

from kljax.cli_grpo import finished_step, main, run  # noqa: F401

if __name__ == "__main__":
  run()
