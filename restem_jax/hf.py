"""Import Hugging Face Llama / Qwen2 / Mistral checkpoints (local folders, or
.gguf files through `restem_jax.gguf`).

`load_config(dir)` maps config.json onto `ModelConfig`; `load_params(dir, cfg,
mesh)` reads safetensors (single file or sharded with an index) and places
every tensor directly on its sharding: each device's slice is read from a
memory map, so no host materialises a whole sharded model.  Nothing here
imports TensorFlow or torch.
"""
from __future__ import annotations

import json
import os
import struct

import jax
import ml_dtypes
import numpy as np

from restem_jax import model as model_lib
from restem_jax import partitioning

SUPPORTED = {"LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM"}
_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
           "F64": np.float64, "I64": np.int64, "I32": np.int32}


def is_gguf(path: str) -> bool:
  return str(path).endswith(".gguf")


def _read_config(model_dir: str) -> tuple[str, dict]:
  if is_gguf(model_dir):
    from restem_jax import gguf
    return model_dir, gguf.config(model_dir)
  path = os.path.join(model_dir, "config.json")
  try:
    with open(path) as f:
      return path, json.load(f)
  except FileNotFoundError:
    raise FileNotFoundError(f"{path}: no config.json (expected a Hugging Face model folder "
                            "or a .gguf file)") from None
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: line {e.lineno}: invalid JSON: {e.msg}") from None


def load_config(model_dir: str, dtype: str = "float32", **overrides) -> model_lib.ModelConfig:
  """ModelConfig of a Hugging Face folder (config.json) or a .gguf file."""
  path, hf = _read_config(model_dir)
  arch = (hf.get("architectures") or ["?"])[0]
  if arch not in SUPPORTED:
    raise ValueError(f"{path}: field 'architectures': {arch!r} is not one of {sorted(SUPPORTED)}")
  scaling = hf.get("rope_scaling") or (hf.get("rope_parameters") or {})
  if scaling.get("rope_type", scaling.get("type", "default")) not in ("default", None):
    raise ValueError(f"{path}: field 'rope_scaling': type {scaling.get('rope_type')!r} "
                     "is not supported (only default rotary embeddings)")
  theta = hf.get("rope_theta", (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0))
  try:
    heads = hf["num_attention_heads"]
    window = hf.get("sliding_window") if arch == "MistralForCausalLM" or hf.get(
        "use_sliding_window") else None
    cfg = dict(
        vocab_size=hf["vocab_size"], d_model=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"], num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        mlp_dim=hf["intermediate_size"], rope_theta=float(theta),
        rms_eps=hf.get("rms_norm_eps", 1e-6),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=arch == "Qwen2ForCausalLM" or bool(hf.get("attention_bias", False)),
        sliding_window=window, dtype=dtype)
  except KeyError as e:
    raise ValueError(f"{path}: missing field {e.args[0]!r}") from None
  cfg.update(overrides)
  return model_lib.ModelConfig(**cfg)


class SafetensorsFile:
  """Memory-mapped tensors of one .safetensors file (header parsed by hand,
  so bfloat16 works without torch)."""

  def __init__(self, path: str):
    self.path = path
    if not os.path.exists(path):
      raise FileNotFoundError(f"{path}: no such safetensors file")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
      head = f.read(8)
      n = struct.unpack("<Q", head)[0] if len(head) == 8 else None
      if n is None or 8 + n > size:
        raise ValueError(f"{path}: truncated safetensors file ({size} bytes; its header "
                         f"{'length is missing' if n is None else f'needs {8 + n}'})")
      try:
        header = json.loads(f.read(n))
      except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a safetensors file (its header is not JSON: {e})") from None
    header.pop("__metadata__", None)
    self.header, self.offset = header, 8 + n
    for name, h in header.items():  # every tensor's bytes lie in the file and fit its shape
      try:
        start, end = (int(x) for x in h["data_offsets"])
        want = int(np.prod(h["shape"])) * np.dtype(_DTYPES.get(h["dtype"], np.uint8)).itemsize
      except (KeyError, TypeError, ValueError):
        raise ValueError(f"{path}: tensor {name!r}: bad header entry {h!r}") from None
      if self.offset + end > size:
        raise ValueError(f"{path}: tensor {name!r} lies at bytes {self.offset + start}..{self.offset + end}, "
                         f"past the end of the file ({size} bytes): the file is truncated")
      if h["dtype"] in _DTYPES and end - start != want:
        raise ValueError(f"{path}: tensor {name!r}: {end - start} bytes for shape {h['shape']} "
                         f"{h['dtype']} (expected {want})")
    self._mm = np.memmap(path, np.uint8, mode="r")

  def keys(self):
    return self.header.keys()

  def get(self, name: str) -> np.ndarray:
    h = self.header[name]
    if h["dtype"] not in _DTYPES:
      raise ValueError(f"{self.path}: tensor {name}: dtype {h['dtype']} not supported")
    start, end = h["data_offsets"]
    raw = self._mm[self.offset + start:self.offset + end]
    return raw.view(_DTYPES[h["dtype"]]).reshape(h["shape"])


def open_checkpoint(model_dir: str) -> dict[str, SafetensorsFile]:
  """tensor name -> file holding it, for single-file or sharded checkpoints (or a .gguf file)."""
  if is_gguf(model_dir):
    from restem_jax import gguf
    return gguf.open_checkpoint(model_dir)
  index = os.path.join(model_dir, "model.safetensors.index.json")
  if os.path.exists(index):
    try:
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
    except json.JSONDecodeError as e:
      raise ValueError(f"{index}: line {e.lineno}: invalid JSON: {e.msg}") from None
    except (KeyError, TypeError):
      raise ValueError(f"{index}: no 'weight_map' object") from None
    missing = sorted({fn for fn in weight_map.values() if not os.path.exists(os.path.join(model_dir, fn))})
    if missing:
      raise FileNotFoundError(f"{index}: lists shard(s) {missing}, not found in {model_dir}")
    files = {fn: SafetensorsFile(os.path.join(model_dir, fn)) for fn in set(weight_map.values())}
    return {name: files[fn] for name, fn in weight_map.items()}
  single = os.path.join(model_dir, "model.safetensors")
  if not os.path.exists(single):
    raise FileNotFoundError(f"{model_dir}: no model.safetensors or model.safetensors.index.json")
  f = SafetensorsFile(single)
  return {name: f for name in f.keys()}


def _hf_name_and_transform(path: tuple, cfg: model_lib.ModelConfig):
  """Our parameter path -> (HF tensor name, fn mapping the HF array to ours)."""
  d, e, h, k = cfg.d_model, cfg.dim_per_head, cfg.num_heads, cfg.num_kv_heads
  if path == ("embed",):
    return "model.embed_tokens.weight", lambda w: w
  if path == ("lm_head",):
    return "lm_head.weight", lambda w: w.T
  if path == ("final_norm", "scale"):
    return "model.norm.weight", lambda w: w
  layer = int(path[0].split("_")[1])
  pre = f"model.layers.{layer}."
  rest = path[1:]
  table = {
      ("attn_norm", "scale"): ("input_layernorm.weight", lambda w: w),
      ("mlp_norm", "scale"): ("post_attention_layernorm.weight", lambda w: w),
      ("attn", "q_proj"): ("self_attn.q_proj.weight", lambda w: w.T.reshape(d, h, e)),
      ("attn", "k_proj"): ("self_attn.k_proj.weight", lambda w: w.T.reshape(d, k, e)),
      ("attn", "v_proj"): ("self_attn.v_proj.weight", lambda w: w.T.reshape(d, k, e)),
      ("attn", "o_proj"): ("self_attn.o_proj.weight", lambda w: w.T.reshape(h, e, d)),
      ("attn", "q_bias"): ("self_attn.q_proj.bias", lambda w: w.reshape(h, e)),
      ("attn", "k_bias"): ("self_attn.k_proj.bias", lambda w: w.reshape(k, e)),
      ("attn", "v_bias"): ("self_attn.v_proj.bias", lambda w: w.reshape(k, e)),
      ("mlp", "gate_proj"): ("mlp.gate_proj.weight", lambda w: w.T),
      ("mlp", "up_proj"): ("mlp.up_proj.weight", lambda w: w.T),
      ("mlp", "down_proj"): ("mlp.down_proj.weight", lambda w: w.T),
  }
  name, fn = table[rest]
  return pre + name, fn


def load_params(model_dir: str, cfg: model_lib.ModelConfig, mesh=None,
                rules=partitioning.DEFAULT_RULES):
  """Parameters of `cfg`'s decoder, read from safetensors, placed sharded."""
  mesh = mesh or partitioning.make_mesh()
  target = partitioning.abstract_target(lambda r: model_lib.init_params(cfg, r), mesh, rules)
  tensors = open_checkpoint(model_dir)
  param_dtype = np.dtype(cfg.param_dtype) if cfg.param_dtype != "bfloat16" else ml_dtypes.bfloat16

  def load(path, shape_dtype):
    keys = tuple(p.key for p in path)
    name, fn = _hf_name_and_transform(keys, cfg)
    if name not in tensors:
      raise KeyError(f"{model_dir}: tensor {name} (for parameter {'/'.join(keys)}) not found")
    arr = fn(tensors[name].get(name))  # a lazy view of the memory map
    if arr.shape != shape_dtype.shape:
      raise ValueError(f"{model_dir}: tensor {name} has shape {arr.shape} after mapping, "
                       f"expected {shape_dtype.shape}")
    return jax.make_array_from_callback(
        arr.shape, shape_dtype.sharding, lambda idx: np.asarray(arr[idx], dtype=param_dtype))

  return jax.tree_util.tree_map_with_path(load, target)


def load(model_dir: str, mesh=None, dtype: str = "float32", **overrides):
  """(ModelConfig, params) of a local Hugging Face model folder or a .gguf file."""
  cfg = load_config(model_dir, dtype=dtype, **overrides)
  return cfg, load_params(model_dir, cfg, mesh)
