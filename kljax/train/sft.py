"""Supervised warm start: next-token cross-entropy on a task's reference answers.

Each example is `<bos> question answer <eos>`; the loss covers the answer and the EOS only. The
result is the reference policy a GRPO run starts from (saved in HF format, like any checkpoint).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from kljax import data as data_lib
from kljax import models, text


def encode_pairs(tokenizer, examples, length: int):
  """Right-padded tokens [B, L], attention mask, and the mask of answer+EOS positions."""
  tokens = np.full((len(examples), length), tokenizer.pad_id, np.int32)
  attn = np.zeros((len(examples), length), bool)
  target = np.zeros((len(examples), length), bool)
  for i, ex in enumerate(examples):
    q = [tokenizer.bos_id] + tokenizer.encode(ex["question"])
    a = tokenizer.encode(ex["answer"]) + [tokenizer.eos_id]
    seq = (q + a)[:length]
    tokens[i, :len(seq)] = seq
    attn[i, :len(seq)] = True
    target[i, len(q):len(seq)] = True
  return tokens, attn, target


def train_sft(*, preset: str, dataset: str, data_dir: str, steps: int, batch_size: int = 64,
              learning_rate: float = 3e-3, length: int = 16, seed: int = 0, progress: bool = True):
  """Returns (model, per-step losses)."""
  from tqdm.auto import tqdm

  tokenizer = text.CharTokenizer()
  source = data_lib.load(dataset, "train", data_dir=data_dir)
  model = models.create(models.preset(preset, vocab_size=tokenizer.vocab_size), seed=seed)
  graphdef, params = nnx.split(model)
  warmup = min(50, max(steps // 4, 1))
  opt = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup,
                                                       max(steps, warmup + 1)))
  opt_state = opt.init(params)

  def loss_fn(p, tokens, attn, target):
    logits = nnx.merge(graphdef, p)(tokens, attention_mask_bt=attn)[:, :-1]
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], axis=-1)[..., 0]
    t = target[:, 1:]
    return -jnp.sum(logp * t) / jnp.maximum(jnp.sum(t), 1)

  @jax.jit
  def step_fn(p, s, tokens, attn, target):
    loss, grads = jax.value_and_grad(loss_fn)(p, tokens, attn, target)
    updates, s = opt.update(grads, s, p)
    return optax.apply_updates(p, updates), s, loss

  losses = []
  for step in tqdm(range(steps), desc="sft", unit="step", disable=not progress):
    idx = data_lib.batch_indices(len(source), batch_size, step, seed=seed)
    batch = encode_pairs(tokenizer, [source[i] for i in idx], length)
    params, opt_state, loss = step_fn(params, opt_state, *batch)
    losses.append(float(loss))
  return nnx.merge(graphdef, params), losses


def initial_model(config, directory: str):
  """The reference policy of a GRPO config: `config.model.init` if set, else a supervised warm start
  on `config.data.name` trained once and cached as an HF checkpoint in `directory`."""
  import os

  path = config.model.init or directory
  if not config.model.init and not os.path.exists(os.path.join(path, "config.json")):
    model, losses = train_sft(preset=config.model.preset, dataset=config.data.name,
                              data_dir=config.data.data_dir, steps=config.sft.steps,
                              batch_size=config.sft.batch_size,
                              learning_rate=config.sft.learning_rate, seed=config.seed)
    models.export_hf(model, path)
    print(f"SFT warm start: loss {losses[0]:.3f} -> {losses[-1]:.3f} ({path})")
  model = models.from_hf(path, dtype=config.model.dtype, param_dtype=config.model.param_dtype)
  model.config = model.config.replace(remat=config.model.remat)
  return model
