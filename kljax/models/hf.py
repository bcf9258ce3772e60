"""Hugging Face checkpoint import and export (Llama / Qwen2 `config.json` + safetensors).

`from_hf(path)` reads a checkpoint directory: `config.json` and either `model.safetensors` or
several shards listed in `model.safetensors.index.json`. `export_hf(model, path)` writes the same
layout back, so a trained policy can be served by any HF-compatible engine. Nothing is downloaded
from the Hub. `path` may be local or a URL (gs://…): remote safetensors files are read whole into
memory, one file at a time (local ones are memory-mapped), and written whole.

Both rope layouts in use are read: top-level `rope_theta` / `rope_scaling` (transformers < 5) and
`rope_parameters` (newer). HF stores linear weights as [out, in]; kljax stores [in, out] per head.
"""

from __future__ import annotations

import functools
import json
import os
import re
import struct
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from kljax import paths
from kljax.models.config import ModelConfig, RopeScaling
from kljax.models.transformer import Decoder, create

SUPPORTED_MODEL_TYPES = ("llama", "qwen2")
_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"


class CheckpointError(ValueError):
  """A checkpoint directory that kljax cannot read: the message names the file, field or tensor."""


# ---- config ----


def _rope_from_hf(cfg: dict[str, Any]) -> tuple[float, RopeScaling | None]:
  params = cfg.get("rope_parameters")
  if params is not None:  # newer layout: theta and scaling together
    theta = params.get("rope_theta", cfg.get("rope_theta", 10_000.0))
    scaling = params
  else:
    theta = cfg.get("rope_theta", 10_000.0)
    scaling = cfg.get("rope_scaling")
  if not scaling:
    return float(theta), None
  rope_type = scaling.get("rope_type", scaling.get("type", "default"))
  if rope_type == "default":
    return float(theta), None
  if rope_type == "llama3":
    return float(theta), RopeScaling(
        "llama3",
        factor=float(scaling["factor"]),
        low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
        high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(scaling.get("original_max_position_embeddings", 8192)),
    )
  if rope_type == "linear":
    return float(theta), RopeScaling("linear", factor=float(scaling["factor"]))
  raise CheckpointError(
      f"config.json: rope scaling type {rope_type!r} is not supported (supported: default, "
      f"llama3, linear)."
  )


def config_from_hf(cfg: dict[str, Any], *, dtype: str = "float32",
                   param_dtype: str | None = None) -> ModelConfig:
  """A `ModelConfig` from a parsed HF `config.json` dict; unsupported features raise CheckpointError."""
  model_type = cfg.get("model_type")
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise CheckpointError(
        f"config.json: model_type {model_type!r} is not supported (supported: "
        f"{', '.join(SUPPORTED_MODEL_TYPES)})."
    )
  act = cfg.get("hidden_act", "silu")
  if act != "silu":
    raise CheckpointError(f"config.json: hidden_act {act!r} is not supported (only 'silu').")
  if cfg.get("mlp_bias", False):
    raise CheckpointError("config.json: mlp_bias=true is not supported.")
  if model_type == "qwen2" and cfg.get("use_sliding_window", False):
    raise CheckpointError("config.json: use_sliding_window=true is not supported.")
  missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                         "num_attention_heads") if k not in cfg]
  if missing:
    raise CheckpointError(f"config.json: missing field(s) {', '.join(missing)}.")
  theta, scaling = _rope_from_hf(cfg)
  heads = int(cfg["num_attention_heads"])
  return ModelConfig(
      vocab_size=int(cfg["vocab_size"]),
      d_model=int(cfg["hidden_size"]),
      num_layers=int(cfg["num_hidden_layers"]),
      num_heads=heads,
      num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
      head_dim=int(cfg.get("head_dim") or cfg["hidden_size"] // heads),
      mlp_dim=int(cfg["intermediate_size"]),
      rope_theta=theta,
      rope_scaling=scaling,
      rms_eps=float(cfg.get("rms_norm_eps", 1e-6)),
      qkv_bias=True if model_type == "qwen2" else bool(cfg.get("attention_bias", False)),
      tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
      param_dtype=param_dtype or dtype,
      dtype=dtype,
      model_type=model_type,
  )


def config_to_hf(config: ModelConfig) -> dict[str, Any]:
  """The HF `config.json` dict for a `ModelConfig` (transformers-4 layout: top-level rope fields)."""
  arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[config.model_type]
  out = {
      "architectures": [arch],
      "model_type": config.model_type,
      "vocab_size": config.vocab_size,
      "hidden_size": config.d_model,
      "intermediate_size": config.mlp_dim,
      "num_hidden_layers": config.num_layers,
      "num_attention_heads": config.num_heads,
      "num_key_value_heads": config.num_kv_heads,
      "head_dim": config.head_dim,
      "hidden_act": "silu",
      "rms_norm_eps": config.rms_eps,
      "rope_theta": config.rope_theta,
      "tie_word_embeddings": config.tie_embeddings,
      "torch_dtype": config.param_dtype,
  }
  if config.model_type == "llama":
    out["attention_bias"] = config.qkv_bias
    out["mlp_bias"] = False
  s = config.rope_scaling
  if s is not None:
    out["rope_scaling"] = (
        {"rope_type": "linear", "factor": s.factor} if s.rope_type == "linear" else
        {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
         "high_freq_factor": s.high_freq_factor,
         "original_max_position_embeddings": s.original_max_position_embeddings})
  return out


# ---- tensors: one table maps HF names to kljax parameters ----


def _layout(config: ModelConfig) -> dict[str, tuple[str, int | None, tuple[int, ...], str]]:
  """HF name -> (kljax param, layer or None, HF shape, how to convert)."""
  c = config
  H, K, Hd, D, F, V = c.num_heads, c.num_kv_heads, c.head_dim, c.d_model, c.mlp_dim, c.vocab_size
  table = {"model.embed_tokens.weight": ("embed", None, (V, D), "copy"),
           "model.norm.weight": ("final_norm", None, (D,), "copy")}
  if not c.tie_embeddings:
    table["lm_head.weight"] = ("lm_head", None, (V, D), "transpose")
  for i in range(c.num_layers):
    p = f"model.layers.{i}."
    table.update({
        p + "input_layernorm.weight": ("attn_norm", i, (D,), "copy"),
        p + "post_attention_layernorm.weight": ("mlp_norm", i, (D,), "copy"),
        p + "self_attn.q_proj.weight": ("wq", i, (H * Hd, D), "in_heads"),
        p + "self_attn.k_proj.weight": ("wk", i, (K * Hd, D), "in_heads"),
        p + "self_attn.v_proj.weight": ("wv", i, (K * Hd, D), "in_heads"),
        p + "self_attn.o_proj.weight": ("wo", i, (D, H * Hd), "heads_out"),
        p + "mlp.gate_proj.weight": ("w_gate", i, (F, D), "transpose"),
        p + "mlp.up_proj.weight": ("w_up", i, (F, D), "transpose"),
        p + "mlp.down_proj.weight": ("w_down", i, (D, F), "transpose"),
    })
    if c.qkv_bias:
      table.update({
          p + "self_attn.q_proj.bias": ("bq", i, (H * Hd,), "heads"),
          p + "self_attn.k_proj.bias": ("bk", i, (K * Hd,), "heads"),
          p + "self_attn.v_proj.bias": ("bv", i, (K * Hd,), "heads"),
      })
  return table


def _to_kljax(x: np.ndarray, how: str, target_shape: tuple[int, ...]) -> np.ndarray:
  if how == "copy":
    return x
  if how == "transpose":
    return x.T
  if how == "in_heads":  # [N*Hd, D] -> [D, N, Hd]
    return x.T.reshape(target_shape)
  if how == "heads_out":  # [D, H*Hd] -> [H, Hd, D]
    return x.T.reshape(target_shape)
  if how == "heads":  # [N*Hd] -> [N, Hd]
    return x.reshape(target_shape)
  raise AssertionError(how)


@functools.partial(jax.jit, static_argnums=0)
def _hf_layout(fn, x: jax.Array) -> jax.Array:
  return fn(x)


def _to_hf(x: np.ndarray, how: str) -> np.ndarray:
  if how == "copy":
    return x
  if how == "transpose":
    return x.T
  if how == "in_heads":  # [D, N, Hd] -> [N*Hd, D]
    return x.reshape(x.shape[0], -1).T
  if how == "heads_out":  # [H, Hd, D] -> [D, H*Hd]
    return x.reshape(-1, x.shape[-1]).T
  if how == "heads":
    return x.reshape(-1)
  raise AssertionError(how)


def _safetensors_header(file: epath.Path) -> dict[str, dict]:
  """Tensor name -> {"shape", "dtype", "data_offsets"} of a safetensors file, from its header
  alone (8 bytes of little-endian length, then that many bytes of JSON): a remote file is not
  downloaded. A file shorter than its header says (a truncated copy) is a CheckpointError."""
  size = file.stat().length
  with file.open("rb") as f:
    head = f.read(8)
    n = struct.unpack("<Q", head)[0] if len(head) == 8 else None
    if n is None or 8 + n > size:
      raise CheckpointError(f"{file}: truncated ({size} bytes, less than its own header): copy "
                            f"the checkpoint again.")
    try:
      header = json.loads(f.read(n))
      tensors = {k: v for k, v in header.items() if k != "__metadata__"}
      end = max((int(v["data_offsets"][1]) for v in tensors.values()), default=0)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError):
      raise CheckpointError(f"{file}: its header is not a safetensors header (a damaged or "
                            f"foreign file).") from None
  if 8 + n + end > size:
    raise CheckpointError(f"{file}: truncated: {size} bytes, where its header lists tensors up "
                          f"to byte {8 + n + end}: copy the checkpoint again.")
  return tensors


def _tensor_files(path: epath.Path) -> dict[str, tuple[epath.Path, tuple[int, ...]]]:
  """HF tensor name -> (safetensors file holding it, its shape), every file's header read."""
  index = path / _INDEX
  if index.exists():
    weight_map = json.loads(index.read_text()).get("weight_map")
    if not weight_map:
      raise CheckpointError(f"{index}: no 'weight_map'.")
    files = {path / name for name in weight_map.values()}
    absent = sorted(os.fspath(f) for f in files if not f.exists())
    if absent:
      raise CheckpointError(f"{index} lists shard(s) that do not exist: {', '.join(absent)}.")
  else:
    files = {path / _SINGLE}
    if not (path / _SINGLE).exists():
      raise CheckpointError(
          f"{path}: neither {_SINGLE} nor {_INDEX} found (only safetensors checkpoints are read).")
  out = {}
  for file in sorted(files):
    out.update({k: (file, tuple(v["shape"])) for k, v in _safetensors_header(file).items()})
  return out


def _open(path: str | os.PathLike, *, dtype: str, param_dtype: str | None):
  """(config, layout, tensor files) of a checkpoint directory whose every tensor is present, with
  the shape config.json implies, and whose layer count is config.json's."""
  path = paths.resolve(path)
  config_path = path / "config.json"
  if not config_path.exists():
    raise CheckpointError(f"{config_path} does not exist.")
  config = config_from_hf(json.loads(config_path.read_text()), dtype=dtype,
                          param_dtype=param_dtype)
  layout = _layout(config)
  tensors = _tensor_files(path)
  where = os.fspath(path / _SINGLE) if not (path / _INDEX).exists() else os.fspath(path)
  layers = {int(m.group(1)) for m in map(_LAYER.match, tensors) if m}
  if layers and max(layers) + 1 != config.num_layers:
    raise CheckpointError(f"{where} holds {max(layers) + 1} layers, but {config_path} says "
                          f"num_hidden_layers={config.num_layers}.")
  missing = [name for name in layout if name not in tensors]
  if missing:
    more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
    raise CheckpointError(f"{path}: missing tensor(s) {', '.join(missing[:5])}{more}.")
  for name, (_, _, hf_shape, _) in layout.items():
    file, shape = tensors[name]
    if shape != hf_shape:
      raise CheckpointError(f"tensor {name} in {file} has shape {list(shape)}, but the config "
                            f"implies {list(hf_shape)} ({config_path}).")
  return config, layout, {name: file for name, (file, _) in tensors.items()}


_LAYER = re.compile(r"model\.layers\.(\d+)\.")


def check_hf(path: str, *, dtype: str = "float32", param_dtype: str | None = None) -> ModelConfig:
  """The `ModelConfig` of a checkpoint directory that `from_hf` can read, without reading its
  weights: `config.json` is supported, and the safetensors files are whole and hold every tensor
  it implies, with its shape, and as many layers (their headers are read). Raises CheckpointError
  like `from_hf`."""
  return _open(path, dtype=dtype, param_dtype=param_dtype)[0]


def from_hf(path: str, *, dtype: str = "float32", param_dtype: str | None = None,
            vocab_multiple: int = 1) -> Decoder:
  """Loads a local HF Llama/Qwen2 checkpoint directory into a `Decoder`.

  Args:
    path: directory with `config.json` and safetensors weights (one file, or shards + index).
    dtype: compute dtype; param_dtype: storage dtype (defaults to `dtype`).
    vocab_multiple: pad the stored vocabulary to this multiple (`ModelConfig.vocab_multiple`).
  Raises:
    CheckpointError naming the missing file, the unsupported config field, or the tensor whose
    shape disagrees with the config.
  """
  config, layout, files = _open(path, dtype=dtype, param_dtype=param_dtype)
  config = config.replace(vocab_multiple=vocab_multiple)
  model = create(config)
  targets = {target for target, _, _, _ in layout.values()}
  arrays = {name: np.zeros(getattr(model, name)[...].shape, np.float32) for name in targets}
  by_file: dict[str, list[str]] = {}
  for name in layout:
    by_file.setdefault(files[name], []).append(name)
  for file, names in by_file.items():
    with _read_tensors(file) as f:
      for name in names:
        target, layer, hf_shape, how = layout[name]
        x = f.get_tensor(name)
        if tuple(x.shape) != hf_shape:
          raise CheckpointError(
              f"tensor {name} in {file.name} has shape {list(x.shape)}, but the config "
              f"implies {list(hf_shape)}."
          )
        if not np.isfinite(x).all():  # else the first step fails, and the advice misleads
          raise CheckpointError(
              f"tensor {name} in {file.name} holds {int((~np.isfinite(x)).sum())} non-finite "
              f"values (NaN or inf): the checkpoint is damaged or was saved after a divergence.")
        dest = arrays[target] if layer is None else arrays[target][layer]
        if target in ("embed", "lm_head"):  # the real vocabulary; padded rows stay zero
          dest = dest[:config.vocab_size] if target == "embed" else dest[:, :config.vocab_size]
        dest[...] = _to_kljax(x.astype(np.float32), how, dest.shape)
  pd = config.jnp_param_dtype
  for name, value in arrays.items():
    getattr(model, name)[...] = jnp.asarray(value, pd)
  return model


class _InMemory:
  """The `safe_open` interface over a dict of arrays (a remote file read whole)."""

  def __init__(self, tensors: dict[str, np.ndarray]):
    self._tensors = tensors

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self._tensors = {}

  def get_tensor(self, name: str) -> np.ndarray:
    return self._tensors[name]


def _read_tensors(file: epath.Path):
  """A context manager with `get_tensor(name)`: `safe_open` (memory-mapped) on a local file;
  the whole file read into memory from a URL."""
  if paths.is_local(file):
    from safetensors import safe_open

    return safe_open(os.fspath(file), framework="numpy")
  from safetensors.numpy import load

  return _InMemory(load(file.read_bytes()))


def hf_weights(model: Decoder, *, tied_head: bool = False) -> Iterator[tuple[str, np.ndarray]]:
  """The model's tensors under their HF names, in HF layout, as float32 numpy arrays (a
  parameter's layers are converted together, one parameter at a time).

  float32 whatever the parameter dtype: exact for bfloat16/float16 parameters, and readable
  without a bfloat16-aware numpy. `tied_head`: with tied embeddings, also yield the embedding as
  `lm_head.weight` (HF files omit it; vLLM's in-place weight reload keeps its old output layer
  unless it is given explicitly).
  """
  config = model.config
  by_target: dict[str, list[tuple[str, int | None, str]]] = {}
  for name, (target, layer, _, how) in _layout(config).items():
    by_target.setdefault(target, []).append((name, layer, how))
  for target, names in by_target.items():  # one parameter converted at a time, every layer
    x = getattr(model, target)[...]
    if target == "embed":  # drop the padded rows (ModelConfig.vocab_multiple)
      x = x[:config.vocab_size]
    elif target == "lm_head":
      x = x[:, :config.vocab_size]
    _, layer, how = names[0]
    # The transposes run in XLA (blocked and multithreaded: a 0.5B model converts in ~2 s on 2
    # CPU cores, numpy's transposes take ~3.4 s); on a CPU the result is then read in place.
    fn = functools.partial(_to_hf, how=how)
    converted = np.asarray(_hf_layout(fn if layer is None else jax.vmap(fn), x.astype(jnp.float32)))
    for name, layer, _ in names:
      value = converted if layer is None else converted[layer]
      yield name, value
    if tied_head and config.tie_embeddings and target == "embed":
      yield "lm_head.weight", value


def export_hf(model: Decoder, path: str | os.PathLike, *, max_shard_bytes: int = 4 << 30) -> None:
  """Writes `config.json` and float32 safetensors (sharded, with an index, above `max_shard_bytes`)
  to a local directory or a URL."""
  from safetensors.numpy import save, save_file

  def write(tensors, name):
    if paths.is_local(path):
      save_file(tensors, os.fspath(path / name), metadata={"format": "pt"})
    else:
      (path / name).write_bytes(save(tensors, metadata={"format": "pt"}))

  config = model.config
  path = paths.resolve(path)
  if paths.is_local(path):
    path.mkdir(parents=True, exist_ok=True)
  tensors = dict(hf_weights(model))
  hf_config = config_to_hf(config)
  hf_config["torch_dtype"] = "float32"

  shards, current, size = [], {}, 0
  for name, value in tensors.items():
    if current and size + value.nbytes > max_shard_bytes:
      shards.append(current)
      current, size = {}, 0
    current[name] = value
    size += value.nbytes
  shards.append(current)
  for stale in ("config.json", _SINGLE, _INDEX):
    (path / stale).unlink(missing_ok=True)
  if len(shards) == 1:
    write(shards[0], _SINGLE)
  else:
    weight_map = {}
    for i, shard in enumerate(shards):
      fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
      write(shard, fname)
      weight_map.update({name: fname for name in shard})
    total = sum(v.nbytes for v in tensors.values())
    (path / _INDEX).write_text(json.dumps({"metadata": {"total_size": total},
                                           "weight_map": weight_map}, indent=2))
  # last: a directory with config.json is complete (the warm start is reused if it exists)
  (path / "config.json").write_text(json.dumps(hf_config, indent=2))
