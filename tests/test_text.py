"""Tokenizers: the built-in character tokenizer and a Hugging Face tokenizer.json made by the test."""

import json

import numpy as np
import pytest

from kljax import text


def test_char_tokenizer_round_trip_and_errors():
  tok = text.CharTokenizer()
  ids = tok.encode("12+34=46")
  assert len(ids) == 8 and min(ids) >= 3
  assert tok.decode(ids + [tok.eos_id, tok.pad_id]) == "12+34=46"
  with pytest.raises(ValueError, match="character '€' is not in the tokenizer's alphabet"):
    tok.encode("1€")


def test_encode_batch_left_pads():
  tok = text.CharTokenizer()
  tokens, mask = text.encode_batch(tok, ["1+1=", "12+30="], add_bos=True)
  assert tokens.shape == (2, 7) and tokens.dtype == np.int32
  np.testing.assert_array_equal(mask[0], [False, False, True, True, True, True, True])
  assert tokens[0, 2] == tok.bos_id and tokens[0, 0] == tok.pad_id
  assert tok.decode(tokens[1]) == "12+30="
  with pytest.raises(ValueError, match="encodes to 6 tokens, more than length=4"):
    text.encode_batch(tok, ["12+30="], length=4)


@pytest.fixture
def hf_dir(tmp_path):
  from tokenizers import Tokenizer, models, pre_tokenizers

  vocab = {"<|pad|>": 0, "<|endoftext|>": 1, "hello": 2, "world": 3, "the": 4, "answer": 5, "[UNK]": 6}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.add_special_tokens(["<|pad|>", "<|endoftext|>"])
  tok.save(str(tmp_path / "tokenizer.json"))
  (tmp_path / "tokenizer_config.json").write_text(
      json.dumps({"eos_token": "<|endoftext|>", "pad_token": {"content": "<|pad|>"}}))
  return tmp_path


def test_hf_tokenizer_json(hf_dir):
  tok = text.HFTokenizer(str(hf_dir))
  assert (tok.eos_id, tok.pad_id, tok.vocab_size) == (1, 0, 7)
  assert tok.encode("hello world the answer") == [2, 3, 4, 5]
  assert tok.decode([2, 3, 1, 0]) == "hello world"
  tokens, mask = text.encode_batch(tok, ["hello", "the answer"])
  np.testing.assert_array_equal(tokens, [[0, 2], [4, 5]])


def test_hf_tokenizer_errors(tmp_path, hf_dir):
  with pytest.raises(FileNotFoundError, match=r"nowhere does not exist \(a Hugging Face tokenizer.json"):
    text.HFTokenizer(str(tmp_path / "nowhere"))
  with pytest.raises(ValueError, match="eos_token '<eos>' is not in the vocabulary"):
    text.HFTokenizer(str(hf_dir), eos_token="<eos>")
