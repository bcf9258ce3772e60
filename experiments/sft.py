"""Supervised warm start of a tiny preset on a task; writes an HF-format checkpoint.

  python -m experiments.sft --workdir DIR [--preset tiny --dataset arithmetic/level1 --steps 400]
  python -m experiments.sft --workdir gs://BUCKET/sft   # DIR (and --data_dir) may be URLs
  python -m experiments.sft --workdir DIR --dataset countdown/n3 --prompt_len 27 --completion_len 14
"""

from absl import app, flags

from kljax import cli, models
from kljax.train.sft import train_sft

_WORKDIR = flags.DEFINE_string("workdir", None, "Where the checkpoint is written.")
_PRESET = flags.DEFINE_string("preset", "tiny", "Model preset.")
_DATASET = flags.DEFINE_string("dataset", "arithmetic/level1", "Task, e.g. arithmetic/level2.")
_DATA_DIR = flags.DEFINE_string("data_dir", "~/.cache/kljax/tfds", "TFDS data directory.")
_STEPS = flags.DEFINE_integer("steps", 400, "Optimizer steps.")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Sequences a step.")
_LR = flags.DEFINE_float("learning_rate", 3e-3, "Peak learning rate.")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 8, "Prompt tokens, with <bos> (GRPO's "
                                   "data.max_prompt_len).")
_COMPLETION_LEN = flags.DEFINE_integer("completion_len", 8, "Answer tokens, with <eos> (GRPO's "
                                       "rollout.max_new_tokens).")
flags.mark_flag_as_required("workdir")


def main(argv):
  del argv
  from kljax import paths

  for flag, path in (("--workdir", _WORKDIR.value), ("--data_dir", _DATA_DIR.value)):
    try:
      paths.check_reachable(path, flag=flag)
    except paths.PathError as err:
      raise app.UsageError(str(err)) from None
  model, losses = train_sft(preset=_PRESET.value, dataset=_DATASET.value,
                            data_dir=_DATA_DIR.value, steps=_STEPS.value,
                            batch_size=_BATCH.value, learning_rate=_LR.value,
                            prompt_len=_PROMPT_LEN.value, completion_len=_COMPLETION_LEN.value)
  models.export_hf(model, _WORKDIR.value)
  print(f"SFT done: loss {losses[0]:.3f} -> {losses[-1]:.3f}; checkpoint in {_WORKDIR.value}")


if __name__ == "__main__":
  cli.run(main)
