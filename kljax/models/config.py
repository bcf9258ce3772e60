"""Decoder configuration: one frozen dataclass, named presets (tiny CPU ones and real checkpoints).

References:
  Qwen2.5 and Llama 3.x `config.json` files as published on the Hugging Face Hub (the numbers below
  are copied from them; tests check the resulting parameter counts against the published totals).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Llama-3.1-style frequency scaling ("llama3" rope_type) or plain linear position scaling."""

  rope_type: Literal["llama3", "linear"]
  factor: float
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A Llama-3 / Qwen2 family decoder.

  Attributes:
    vocab_size, d_model, num_layers, num_heads, num_kv_heads, head_dim, mlp_dim: the shapes.
    rope_theta: rotary base; rope_scaling: optional `RopeScaling`.
    rms_eps: RMSNorm epsilon.
    qkv_bias: biases on the q/k/v projections (Qwen2).
    tie_embeddings: the unembedding is the transposed embedding.
    param_dtype: storage dtype of the parameters; dtype: compute dtype of activations and matmuls.
      Log-probabilities are always computed in float32 downstream.
    remat: rematerialize each block in the backward pass (less memory, ~⅓ more compute).
    scan_layers: run the stacked layers with `jax.lax.scan` (compile time independent of depth);
      False unrolls them (faster on CPU for shallow models; slow to compile for deep ones). Training
      and scoring only: the sampler's decode loop always runs unrolled layers.
    model_type: "llama" or "qwen2" (what `export_hf` writes).
    vocab_multiple: the embedding (and untied unembedding) store `padded_vocab` rows, the
      vocabulary rounded up to this multiple, so that a large mesh axis divides them (151,936 =
      2⁷·1187 → 152,064 = 256·594 for 256 devices). The extra rows are never read: the
      unembedding is sliced back to `vocab_size`, so logits, sampling and HF files are unchanged.
  """

  vocab_size: int
  d_model: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  rope_theta: float = 10_000.0
  rope_scaling: RopeScaling | None = None
  rms_eps: float = 1e-6
  qkv_bias: bool = False
  tie_embeddings: bool = False
  param_dtype: str = "float32"
  dtype: str = "float32"
  remat: bool = False
  scan_layers: bool = True
  model_type: Literal["llama", "qwen2"] = "llama"
  vocab_multiple: int = 1

  def __post_init__(self):
    for field in ("vocab_multiple", "vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                  "mlp_dim"):
      if int(getattr(self, field)) < 1:
        raise ValueError(f"ModelConfig.{field} must be >= 1, got {getattr(self, field)}.")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"ModelConfig.num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
          f"({self.num_kv_heads}) for grouped-query attention."
      )
    if self.head_dim % 2:
      raise ValueError(f"ModelConfig.head_dim must be even for rotary embeddings, got {self.head_dim}.")
    for field in ("param_dtype", "dtype"):
      if getattr(self, field) not in ("float32", "bfloat16", "float16"):
        raise ValueError(
            f"ModelConfig.{field} must be 'float32', 'bfloat16' or 'float16', got "
            f"{getattr(self, field)!r}."
        )
    if self.model_type not in ("llama", "qwen2"):
      raise ValueError(f"ModelConfig.model_type must be 'llama' or 'qwen2', got {self.model_type!r}.")

  @property
  def padded_vocab(self) -> int:
    """Rows of the stored embedding: `vocab_size` rounded up to a multiple of `vocab_multiple`."""
    return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple

  @property
  def jnp_param_dtype(self):
    return jnp.dtype(self.param_dtype)

  @property
  def jnp_dtype(self):
    return jnp.dtype(self.dtype)

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)

  def num_params(self) -> int:
    """Parameter count from the shapes alone (embeddings included), as HF reports it."""
    d, h, k, hd, f, v = (self.d_model, self.num_heads, self.num_kv_heads, self.head_dim,
                         self.mlp_dim, self.vocab_size)
    attn = d * h * hd + 2 * d * k * hd + h * hd * d
    if self.qkv_bias:
      attn += h * hd + 2 * k * hd
    per_layer = attn + 3 * d * f + 2 * d
    return v * d * (1 if self.tie_embeddings else 2) + self.num_layers * per_layer + d


_LLAMA3_SCALING_32 = RopeScaling("llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                 original_max_position_embeddings=8192)
_LLAMA3_SCALING_8 = RopeScaling("llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                original_max_position_embeddings=8192)

PRESETS: dict[str, ModelConfig] = {
    # Tiny CPU models for tests and the small experiments (unrolled layers: faster on CPU).
    "tiny": ModelConfig(vocab_size=64, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2,
                        head_dim=16, mlp_dim=128, rope_theta=10_000.0, scan_layers=False),
    "tiny-qwen": ModelConfig(vocab_size=64, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2,
                             head_dim=16, mlp_dim=128, qkv_bias=True, tie_embeddings=True,
                             model_type="qwen2", scan_layers=False),
    "small": ModelConfig(vocab_size=512, d_model=256, num_layers=4, num_heads=4, num_kv_heads=2,
                         head_dim=64, mlp_dim=688, scan_layers=False),
    # ~20M parameters: the train-step benchmark.
    "20m": ModelConfig(vocab_size=8192, d_model=512, num_layers=4, num_heads=8, num_kv_heads=4,
                       head_dim=64, mlp_dim=1536, scan_layers=False),
    # Real checkpoints (shapes from their published config.json).
    "qwen2.5-0.5b": ModelConfig(vocab_size=151_936, d_model=896, num_layers=24, num_heads=14,
                                num_kv_heads=2, head_dim=64, mlp_dim=4864, rope_theta=1_000_000.0,
                                rms_eps=1e-6, qkv_bias=True, tie_embeddings=True, model_type="qwen2",
                                dtype="bfloat16"),
    "qwen2.5-1.5b": ModelConfig(vocab_size=151_936, d_model=1536, num_layers=28, num_heads=12,
                                num_kv_heads=2, head_dim=128, mlp_dim=8960, rope_theta=1_000_000.0,
                                rms_eps=1e-6, qkv_bias=True, tie_embeddings=True, model_type="qwen2",
                                dtype="bfloat16"),
    "qwen2.5-math-1.5b": ModelConfig(vocab_size=151_936, d_model=1536, num_layers=28, num_heads=12,
                                     num_kv_heads=2, head_dim=128, mlp_dim=8960,
                                     rope_theta=10_000.0, rms_eps=1e-6, qkv_bias=True,
                                     tie_embeddings=True, model_type="qwen2", dtype="bfloat16"),
    "qwen2.5-7b": ModelConfig(vocab_size=152_064, d_model=3584, num_layers=28, num_heads=28,
                              num_kv_heads=4, head_dim=128, mlp_dim=18944, rope_theta=1_000_000.0,
                              rms_eps=1e-6, qkv_bias=True, tie_embeddings=False, model_type="qwen2",
                              dtype="bfloat16"),
    "llama-3.2-1b": ModelConfig(vocab_size=128_256, d_model=2048, num_layers=16, num_heads=32,
                                num_kv_heads=8, head_dim=64, mlp_dim=8192, rope_theta=500_000.0,
                                rope_scaling=_LLAMA3_SCALING_32, rms_eps=1e-5, tie_embeddings=True,
                                dtype="bfloat16"),
    "llama-3.1-8b": ModelConfig(vocab_size=128_256, d_model=4096, num_layers=32, num_heads=32,
                                num_kv_heads=8, head_dim=128, mlp_dim=14336, rope_theta=500_000.0,
                                rope_scaling=_LLAMA3_SCALING_8, rms_eps=1e-5, tie_embeddings=False,
                                dtype="bfloat16"),
}


def preset(name: str, **overrides) -> ModelConfig:
  """A named preset, optionally with fields replaced (e.g. `preset("small", remat=True)`)."""
  if name not in PRESETS:
    raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}.")
  return PRESETS[name].replace(**overrides)
