"""How rare the correct answers are under a warm start: teacher-forced log π_ref(answer + EOS |
prompt) on up to 1000 test prompts (no training), as quoted in experiments/results/stress_search.md.

  python -m experiments.stress_refprob WARM_START_DIR arithmetic/level1 PROMPT_LEN COMPLETION_LEN

WARM_START_DIR: the `sft` folder a GRPO run writes in its workdir.
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np

from kljax import data as data_lib
from kljax import models, text
from kljax.train.sft import encode_pairs


def correct_logprobs(sft_dir: str, dataset: str, prompt_len: int, completion_len: int,
                     count: int = 1000, *, answer: str | None = None,
                     data_dir: str = "~/.cache/kljax/tfds") -> np.ndarray:
  """log π_ref(answer + EOS | prompt) (float32) of the first `count` test examples, the completion
  cut to `completion_len` tokens; `answer`: score this text after every prompt instead of the
  example's own answer."""
  tok = text.CharTokenizer()
  src = data_lib.load(dataset, "test", data_dir=data_dir)
  examples = src.take(range(min(len(src), count)))
  if answer is not None:
    examples = [{**ex, "answer": answer} for ex in examples]
  tokens, attn, target = encode_pairs(tok, examples, prompt_len=prompt_len,
                                      completion_len=completion_len)
  model = models.from_hf(sft_dir)
  logits = model(jnp.asarray(tokens), attention_mask_bt=jnp.asarray(attn))[:, :-1]
  logp = jax.nn.log_softmax(logits.astype(jnp.float32))
  lp = jnp.take_along_axis(logp, jnp.asarray(tokens)[:, 1:, None], axis=-1)[..., 0]
  return np.asarray((lp * target[:, 1:]).sum(1), np.float32)


if __name__ == "__main__":
  sft_dir, dataset, plen, clen = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
  seq = correct_logprobs(sft_dir, dataset, plen, clen)
  q = np.percentile(-seq, [10, 25, 50, 75, 90])
  print(f"{dataset}: -log pi_ref(correct) percentiles 10/25/50/75/90: {np.round(q, 2)}; "
        f"mean pi_ref(correct) {np.exp(seq).mean():.4f}; fraction <= e^-5: {np.mean(seq <= -5):.2f}")
