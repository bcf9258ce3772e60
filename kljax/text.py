"""Tokenizers: a small built-in character tokenizer for the synthetic tasks, and HF `tokenizer.json`.

Both expose `encode(text) -> list[int]`, `decode(ids) -> str`, `vocab_size`, `pad_id`, `bos_id`,
`eos_id`; `encode_batch` turns texts into left-padded `[B, P]` prompts and masks for the sampler.
"""

from __future__ import annotations

import json
import os
from typing import Protocol, Sequence

import numpy as np

from kljax import paths


class Tokenizer(Protocol):
  vocab_size: int
  pad_id: int
  bos_id: int
  eos_id: int

  def encode(self, text: str) -> list[int]: ...

  def decode(self, ids: Sequence[int]) -> str: ...


class CharTokenizer:
  """One token per character of a fixed alphabet, plus <pad>=0, <bos>=1, <eos>=2."""

  SPECIALS = ("<pad>", "<bos>", "<eos>")
  DEFAULT_ALPHABET = "0123456789+-*/=()<>.,:;?! abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ#\n"

  def __init__(self, alphabet: str = DEFAULT_ALPHABET):
    if len(set(alphabet)) != len(alphabet):
      raise ValueError("alphabet must not repeat a character.")
    self.alphabet = alphabet
    self._ids = {ch: i + len(self.SPECIALS) for i, ch in enumerate(alphabet)}
    self.vocab_size = len(self.SPECIALS) + len(alphabet)
    self.pad_id, self.bos_id, self.eos_id = 0, 1, 2

  def encode(self, text: str) -> list[int]:
    try:
      return [self._ids[ch] for ch in text]
    except KeyError as err:
      raise ValueError(
          f"character {err.args[0]!r} is not in the tokenizer's alphabet {self.alphabet!r}."
      ) from None

  def decode(self, ids: Sequence[int]) -> str:
    n = len(self.SPECIALS)
    return "".join(self.alphabet[i - n] for i in ids if n <= int(i) < self.vocab_size)


class HFTokenizer:
  """A Hugging Face `tokenizer.json` (the `tokenizers` library); special ids from the files.
  `path`: the file or its directory, local or a URL (gs://…)."""

  def __init__(self, path: str | os.PathLike, *, pad_token: str | None = None,
               bos_token: str | None = None, eos_token: str | None = None):
    from tokenizers import Tokenizer as _Tokenizer

    path = paths.resolve(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.exists():
      raise FileNotFoundError(f"{file} does not exist (a Hugging Face tokenizer.json is expected).")
    self._tok = _Tokenizer.from_str(file.read_text(encoding="utf-8"))
    config = {}
    config_file = file.parent / "tokenizer_config.json"
    if config_file.exists():
      config = json.loads(config_file.read_text(encoding="utf-8"))

    def special(given, key):
      token = given or config.get(key)
      if isinstance(token, dict):
        token = token.get("content")
      if token is None:
        return None
      tid = self._tok.token_to_id(token)
      if tid is None:
        raise ValueError(f"{key} {token!r} is not in the vocabulary of {file}.")
      return tid

    self.eos_id = special(eos_token, "eos_token")
    if self.eos_id is None:
      raise ValueError(f"no eos_token: pass eos_token= or give {config_file} an 'eos_token'.")
    self.bos_id = special(bos_token, "bos_token")
    pad = special(pad_token, "pad_token")
    self.pad_id = self.eos_id if pad is None else pad
    self.vocab_size = self._tok.get_vocab_size()

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Sequence[int]) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)


def encode_batch(tokenizer: Tokenizer, texts: Sequence[str], *, add_bos: bool = False,
                 length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Left-padded int32 tokens [B, P] and a bool mask [B, P] (P = the longest, or `length`)."""
  seqs = [([tokenizer.bos_id] if add_bos and tokenizer.bos_id is not None else [])
          + tokenizer.encode(t) for t in texts]
  width = max(map(len, seqs)) if length is None else length
  if any(len(s) > width for s in seqs):
    raise ValueError(f"a text encodes to {max(map(len, seqs))} tokens, more than length={width}.")
  tokens = np.full((len(seqs), width), tokenizer.pad_id, np.int32)
  mask = np.zeros((len(seqs), width), bool)
  for i, s in enumerate(seqs):
    if s:
      tokens[i, width - len(s):] = s
      mask[i, width - len(s):] = True
  return tokens, mask


def load_tokenizer(path: str | os.PathLike | None) -> Tokenizer:
  """The tokenizer of a run: a tokenizer.json (or its directory) at `path`, or the built-in
  character tokenizer when `path` is empty."""
  return HFTokenizer(path) if path else CharTokenizer()


def encode_prompt(tokenizer, example: dict[str, str], *, prompt_template: str = "{question}",
                  add_bos: bool = True) -> list[int]:
  """The prompt tokens of an example, as a GRPO run feeds them: `<bos>` (if `add_bos`) and the
  template filled with the example's fields."""
  bos = [tokenizer.bos_id] if add_bos and tokenizer.bos_id is not None else []
  return bos + tokenizer.encode(prompt_template.format(**example))


def longest_prompt(tokenizer, examples, *, prompt_template: str = "{question}",
                   add_bos: bool = True) -> tuple[int, int]:
  """(tokens, index) of the example whose prompt (`encode_prompt`) is longest."""
  lengths = [len(encode_prompt(tokenizer, ex, prompt_template=prompt_template, add_bos=add_bos))
             for ex in examples]
  i = int(np.argmax(lengths))
  return lengths[i], i
