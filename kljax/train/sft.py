"""Supervised warm start: next-token cross-entropy on a task's reference answers.

Each example is `<bos> prompt answer <eos>`, with the prompt as a GRPO run formats it; the loss
covers the answer and the EOS only. The result is the reference policy a GRPO run starts from
(saved in HF format, like any checkpoint).
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from kljax import data as data_lib
from kljax import models, paths, text
from kljax.progress import bar as tqdm  # log lines when not on a terminal
from kljax.text import encode_prompt, longest_prompt  # noqa: F401 - sft's names too
from kljax.train.options import ConfigError
from kljax.train.validate import check_prompt_lengths


def encode_pairs(tokenizer, examples, *, prompt_len: int, completion_len: int,
                 prompt_template: str = "{question}", add_bos: bool = True):
  """Right-padded tokens [B, prompt_len + completion_len], attention mask, and the mask of the
  supervised positions: each row is `prompt answer <eos>` with the answer and EOS cut to
  `completion_len` tokens, the most a GRPO rollout generates.

  Raises ValueError when a prompt takes more than `prompt_len` tokens.
  """
  length = prompt_len + completion_len
  tokens = np.full((len(examples), length), tokenizer.pad_id, np.int32)
  attn = np.zeros((len(examples), length), bool)
  target = np.zeros((len(examples), length), bool)
  for i, ex in enumerate(examples):
    q = encode_prompt(tokenizer, ex, prompt_template=prompt_template, add_bos=add_bos)
    if len(q) > prompt_len:
      raise ValueError(f"prompt_len={prompt_len}: the prompt {prompt_template.format(**ex)!r} "
                       f"encodes to {len(q)} tokens.")
    a = (tokenizer.encode(ex["answer"]) + [tokenizer.eos_id])[:completion_len]
    seq = q + a
    tokens[i, :len(seq)] = seq
    attn[i, :len(seq)] = True
    target[i, len(q):len(seq)] = True
  return tokens, attn, target


def _check_lengths(tokenizer, examples, dataset: str, *, prompt_len: int, completion_len: int,
                   prompt_template: str, add_bos: bool) -> None:
  """Raises ValueError when a prompt is longer than `prompt_len`; warns when answers are cut."""
  longest, i = longest_prompt(tokenizer, examples, prompt_template=prompt_template,
                              add_bos=add_bos)
  if longest > prompt_len:
    raise ValueError(
        f"prompt_len={prompt_len}: the longest prompt of {dataset} (train example {i}, "
        f"{prompt_template.format(**examples[i])!r}) encodes to {longest} tokens, so its answer "
        f"would be cut away and nothing supervised; raise prompt_len to at least {longest}.")
  answers = [len(tokenizer.encode(ex["answer"])) + 1 for ex in examples]
  cut = sum(n > completion_len for n in answers)
  if cut:
    warnings.warn(f"{cut} of {len(answers)} answers of {dataset} (with EOS) take more than "
                  f"completion_len={completion_len} tokens (the longest {max(answers)}) and are "
                  f"cut: the warm start never sees their end.", stacklevel=3)


def train_sft(*, preset: str, dataset: str, data_dir: str, steps: int, batch_size: int = 64,
              learning_rate: float = 3e-3, prompt_len: int = 8, completion_len: int = 8,
              prompt_template: str = "{question}", add_bos: bool = True, seed: int = 0,
              progress: bool = True, manual_dir: str | None = None,
              tokenizer: str | None = None):
  """Returns (model, per-step losses). `manual_dir`: where the dataset's source files are, for
  datasets prepared from them (`kljax.data.load`); `tokenizer`: a tokenizer.json or its directory
  (a GRPO config's `model.tokenizer`; default the built-in character tokenizer), whose vocabulary
  sizes the model.

  Prompts take up to `prompt_len` tokens and answers (with EOS) up to `completion_len`: in a GRPO
  config, `data.max_prompt_len` and `rollout.max_new_tokens`. Before any training step it raises
  ValueError when a prompt of the dataset is longer than `prompt_len` (its example would keep no
  answer token to supervise) or the dataset holds fewer than `batch_size` examples, and warns when
  answers are cut.
  """

  for name, value in (("prompt_len", prompt_len), ("completion_len", completion_len)):
    if value < 1:
      raise ValueError(f"{name} must be >= 1, got {value}.")
  tokenizer = text.HFTokenizer(tokenizer) if tokenizer else text.CharTokenizer()
  source = data_lib.load(dataset, "train", data_dir=data_dir, manual_dir=manual_dir)
  if len(source) < batch_size:
    raise ValueError(f"batch_size {batch_size} exceeds the {len(source)} examples of {dataset}'s "
                     f"train split.")
  examples = source.take(range(len(source)))
  fmt = dict(prompt_template=prompt_template, add_bos=add_bos)
  _check_lengths(tokenizer, examples, dataset, prompt_len=prompt_len,
                 completion_len=completion_len, **fmt)
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
    batch = encode_pairs(tokenizer, [examples[i] for i in idx], prompt_len=prompt_len,
                         completion_len=completion_len, **fmt)
    params, opt_state, loss = step_fn(params, opt_state, *batch)
    losses.append(float(loss))
  return nnx.merge(graphdef, params), losses


def initial_model(config, directory: str, *, checked: bool = False):
  """The reference policy of a GRPO config: `config.model.init` if set, else a supervised warm start
  on `config.data.name` trained once and cached as an HF checkpoint in `directory`, on prompts and
  answers of the run's lengths (`data.max_prompt_len`, `rollout.max_new_tokens`).

  The warm start uses the run's tokenizer (`model.tokenizer`, else the built-in character one).
  Both paths may be local or URLs (gs://…). Raises `grpo.ConfigError` before training when a
  prompt needs more than `data.max_prompt_len` tokens or the dataset holds fewer examples than
  `sft.batch_size`, and when a cached warm start's vocabulary is not the tokenizer's (it was made
  with another tokenizer). `checked`: the caller has run `check_prompt_lengths` on this config
  (`kljax-grpo` does, once a launch)."""
  path = paths.resolve(config.model.init or directory)
  if not config.model.init and not (path / "config.json").exists():
    if not checked:
      check_prompt_lengths(config)  # names the flag to raise
    size = len(data_lib.load(config.data.name, "train", data_dir=config.data.data_dir,
                             manual_dir=config.data.get("manual_dir") or None))
    if size < config.sft.batch_size:
      raise ConfigError(
          f"--config.sft.batch_size: the warm start takes {config.sft.batch_size} examples a "
          f"step, more than the {size} of {config.data.name}'s train split.")
    model, losses = train_sft(preset=config.model.preset, dataset=config.data.name,
                              data_dir=config.data.data_dir, steps=config.sft.steps,
                              batch_size=config.sft.batch_size,
                              learning_rate=config.sft.learning_rate,
                              prompt_len=config.data.max_prompt_len,
                              completion_len=config.rollout.max_new_tokens,
                              prompt_template=config.data.prompt_template,
                              add_bos=config.data.add_bos, seed=config.seed,
                              manual_dir=config.data.get("manual_dir") or None,
                              tokenizer=config.model.tokenizer or None)
    models.export_hf(model, path)
    print(f"SFT warm start: loss {losses[0]:.3f} -> {losses[-1]:.3f} ({path})")
  elif not config.model.init:
    vocab = text.load_tokenizer(config.model.tokenizer).vocab_size
    cached = models.check_hf(path).vocab_size
    if cached != vocab:
      raise ConfigError(
          f"--config.model.tokenizer: the warm start cached in {path} has a vocabulary of "
          f"{cached} tokens and the run's tokenizer ({config.model.tokenizer or 'built-in'}) "
          f"{vocab}: it was made with another tokenizer; remove {path} to make it again.")
  model = models.from_hf(path, dtype=config.model.dtype, param_dtype=config.model.param_dtype)
  model.config = model.config.replace(remat=config.model.remat)
  return model
