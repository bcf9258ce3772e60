"""Checkpoint import/export against Hugging Face transformers (PyTorch CPU) as the independent reference."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

import torch  # the test extra installs the CPU build; see pyproject.toml
import transformers

from kljax import models
from kljax.models.hf import CheckpointError, config_from_hf

TOKENS = np.array([[5, 6, 7, 8, 9, 10, 11, 12], [0, 0, 0, 13, 14, 15, 16, 17]])
MASK = np.array([[1] * 8, [0, 0, 0, 1, 1, 1, 1, 1]])


def _perturb(model):
  torch.manual_seed(1)
  with torch.no_grad():  # non-trivial norms and biases, so their mapping is really tested
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  return model.eval()


def _llama(path):
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(
      vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=500000.0,
      rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0, "original_max_position_embeddings": 4},
      tie_word_embeddings=True, rms_norm_eps=1e-5, max_position_embeddings=256)
  model = _perturb(transformers.LlamaForCausalLM(cfg))
  model.save_pretrained(path)
  return model


def _qwen(path):
  torch.manual_seed(0)
  cfg = transformers.Qwen2Config(
      vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0, tie_word_embeddings=False,
      rms_norm_eps=1e-6, max_position_embeddings=256)
  model = _perturb(transformers.Qwen2ForCausalLM(cfg))
  model.save_pretrained(path)
  return model


def _hf_logits(model, tokens=TOKENS, mask=MASK):
  positions = np.maximum(np.cumsum(mask, 1) - 1, 0)  # the positions kljax gives left-padded rows
  with torch.no_grad():
    return model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask),
                 position_ids=torch.tensor(positions)).logits.float().numpy()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  root = tmp_path_factory.mktemp("hf")
  return {"llama": (_llama(root / "llama"), root / "llama"),
          "qwen2": (_qwen(root / "qwen2"), root / "qwen2")}


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_logits_parity_with_transformers(checkpoints, kind):
  hf_model, path = checkpoints[kind]
  ours = models.from_hf(str(path))
  assert ours.config.model_type == kind
  logits = np.asarray(ours(jnp.asarray(TOKENS), attention_mask_bt=jnp.asarray(MASK)))
  ref = _hf_logits(hf_model)
  assert np.abs(logits - ref)[MASK.astype(bool)].max() <= 1e-4


def test_llama_checkpoint_exercises_scaling_and_tying(checkpoints):
  ours = models.from_hf(str(checkpoints["llama"][1]))
  assert ours.config.tie_embeddings and ours.config.rope_scaling.rope_type == "llama3"
  assert ours.config.rope_scaling.factor == 8.0


def test_both_config_layouts_parse_alike(checkpoints):
  path = checkpoints["llama"][1]
  with open(path / "config.json") as f:
    cfg = json.load(f)
  new = dict(cfg)
  new.pop("rope_scaling", None)
  new.pop("rope_theta", None)
  new["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 4}
  old = dict(cfg)
  old.pop("rope_parameters", None)
  old["rope_theta"] = 500000.0
  old["rope_scaling"] = {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 4}
  assert config_from_hf(new) == config_from_hf(old)
  assert config_from_hf(new).rope_theta == 500000.0


@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
def test_export_import_round_trip_is_exact(tmp_path, param_dtype):
  cfg = models.preset("tiny-qwen", param_dtype=param_dtype)
  model = models.create(cfg, seed=4)
  models.export_hf(model, str(tmp_path))
  back = models.from_hf(str(tmp_path), dtype="float32", param_dtype=param_dtype)
  for name in ["embed", "wq", "wk", "wv", "wo", "bq", "bk", "bv", "w_gate", "w_up", "w_down",
               "attn_norm", "mlp_norm", "final_norm"]:
    np.testing.assert_array_equal(np.asarray(getattr(back, name)[...], np.float32),
                                  np.asarray(getattr(model, name)[...], np.float32), err_msg=name)


def test_sharded_export_with_index_and_hf_loads_it(tmp_path, checkpoints):
  ours = models.from_hf(str(checkpoints["qwen2"][1]))
  models.export_hf(ours, str(tmp_path), max_shard_bytes=40_000)
  index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
  shards = set(index["weight_map"].values())
  assert len(shards) > 2 and all((tmp_path / s).exists() for s in shards)
  again = models.from_hf(str(tmp_path))
  np.testing.assert_array_equal(again(jnp.asarray(TOKENS)), ours(jnp.asarray(TOKENS)))
  # An HF-compatible engine serves the export: transformers itself reproduces the logits.
  served = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
  ref = _hf_logits(served)
  mine = np.asarray(ours(jnp.asarray(TOKENS), attention_mask_bt=jnp.asarray(MASK)))
  assert np.abs(mine - ref)[MASK.astype(bool)].max() <= 1e-4


def _copy(src, dst):
  import shutil
  shutil.copytree(src, dst)
  return dst


def test_clear_errors(tmp_path, checkpoints):
  src = checkpoints["llama"][1]
  with pytest.raises(CheckpointError, match="config.json does not exist"):
    models.from_hf(str(tmp_path))

  no_weights = _copy(src, tmp_path / "no_weights")
  os.remove(no_weights / "model.safetensors")
  with pytest.raises(CheckpointError, match="neither model.safetensors nor model.safetensors.index.json"):
    models.from_hf(str(no_weights))

  bad_type = _copy(src, tmp_path / "bad_type")
  cfg = json.loads((bad_type / "config.json").read_text())
  (bad_type / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
  with pytest.raises(CheckpointError, match="model_type 'gpt2' is not supported"):
    models.from_hf(str(bad_type))

  yarn = dict(cfg, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4})
  with pytest.raises(CheckpointError, match="rope scaling type 'yarn' is not supported"):
    config_from_hf(yarn)

  wrong_shape = _copy(src, tmp_path / "wrong_shape")
  (wrong_shape / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 100}))
  with pytest.raises(CheckpointError,
                     match=r"tensor model.layers.0.mlp.gate_proj.weight .* has shape \[96, 64\], "
                           r"but the config implies \[100, 64\]"):
    models.from_hf(str(wrong_shape))

  untied = _copy(src, tmp_path / "untied")
  (untied / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": False}))
  with pytest.raises(CheckpointError, match="missing tensor.*lm_head.weight"):
    models.from_hf(str(untied))

  sharded = tmp_path / "sharded"
  models.export_hf(models.from_hf(str(src)), str(sharded), max_shard_bytes=40_000)
  first = sorted(p for p in os.listdir(sharded) if p.startswith("model-"))[0]
  os.remove(sharded / first)
  with pytest.raises(CheckpointError, match=f"lists shard\\(s\\) that do not exist: .*{first}"):
    models.from_hf(str(sharded))
