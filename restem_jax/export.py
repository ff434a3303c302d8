"""Export a trained policy (or reward model) to a Hugging Face folder and to GGUF.

    python -m restem_jax.export --checkpoint runs/arith_smollm/iter_2/train --out models/arith \
        --base "$(python -c 'from restem_jax import gguf; print(gguf.smollm2_path())')" \
        [--dtype float32|bfloat16|float16] [--gguf models/arith.gguf --gguf_type f32|f16|q8_0]

`--checkpoint` is anything `checkpoints.load_params` reads: a training folder
(its best step by validation), a Hugging Face folder or a `.gguf` file.  The
architecture (Llama, Qwen2 or Mistral, rope, tied embeddings, biases, sliding
window), the tokenizer, its chat template and the generation settings come
from `--base` (default: the checkpoint itself when it is a model folder or a
GGUF file); the checkpoint's tensors must fit the base's shapes.

The folder: config.json, generation_config.json, model.safetensors (or shards
with model.safetensors.index.json), the tokenizer files.  A reward model
(`--reward_model`) is written as `<Arch>ForTokenClassification` with three
labels (NEGATIVE, NEUTRAL, POSITIVE): its `score` layer is the head on the
final hidden states, so `softmax(logits)[..., 2]` is P(POSITIVE) per token.

The GGUF file follows llama.cpp's layout: `blk.N.*` tensor names, the q/k rows
of "llama" models permuted to interleaved rotary pairs, 1-D tensors in float32,
the byte-level BPE vocabulary with its pre-tokenizer name and chat template.
With several processes every one must call `export`; process 0 writes.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil

import jax
import numpy as np

from restem_jax import hf, multihost
from restem_jax import model as model_lib

MODEL_TYPES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "MistralForCausalLM": "mistral"}
GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}  # llama.cpp runs Mistral as llama
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json")
LABELS = ("NEGATIVE", "NEUTRAL", "POSITIVE")  # reward.NEGATIVE, NEUTRAL, POSITIVE


def _np(x) -> np.ndarray:
  """A host copy of a (possibly sharded, possibly multi-host) array, as float32."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(jax.device_get(x), np.float32)


def state_dict(params, cfg: model_lib.ModelConfig) -> dict[str, np.ndarray]:
  """Hugging Face tensor name -> float32 array of a decoder's parameters (the
  inverse of `hf.load_params`' mapping)."""
  d, e, h, k = cfg.d_model, cfg.dim_per_head, cfg.num_heads, cfg.num_kv_heads
  out = {"model.embed_tokens.weight": _np(params["embed"]),
         "model.norm.weight": _np(params["final_norm"]["scale"])}
  if not cfg.tie_embeddings:
    out["lm_head.weight"] = _np(params["lm_head"]).T
  for i in range(cfg.num_layers):
    p, pre = params[f"layer_{i}"], f"model.layers.{i}."
    a, m = p["attn"], p["mlp"]
    out[pre + "input_layernorm.weight"] = _np(p["attn_norm"]["scale"])
    out[pre + "post_attention_layernorm.weight"] = _np(p["mlp_norm"]["scale"])
    out[pre + "self_attn.q_proj.weight"] = _np(a["q_proj"]).reshape(d, h * e).T
    out[pre + "self_attn.k_proj.weight"] = _np(a["k_proj"]).reshape(d, k * e).T
    out[pre + "self_attn.v_proj.weight"] = _np(a["v_proj"]).reshape(d, k * e).T
    out[pre + "self_attn.o_proj.weight"] = _np(a["o_proj"]).reshape(h * e, d).T
    if cfg.qkv_bias:
      for name in ("q", "k", "v"):
        out[pre + f"self_attn.{name}_proj.bias"] = _np(a[f"{name}_bias"]).reshape(-1)
    for name in ("gate_proj", "up_proj", "down_proj"):
      out[pre + f"mlp.{name}.weight"] = _np(m[name]).T
  return {name: np.ascontiguousarray(w) for name, w in out.items()}


def _differences(a: model_lib.ModelConfig, b: model_lib.ModelConfig) -> list[str]:
  skip = {"dtype", "param_dtype", "remat"}
  return [f"{f}: {getattr(a, f)!r} vs {getattr(b, f)!r}" for f in a.__dataclass_fields__
          if f not in skip and getattr(a, f) != getattr(b, f)]


def hf_config(cfg: model_lib.ModelConfig, base: str, dtype: str, reward_model: bool = False) -> dict:
  """config.json for `cfg`, starting from the base's (its architecture, token ids,
  context length and any other field); fails when the base's architecture differs."""
  path, conf = hf._read_config(base)
  want = hf.load_config(base)
  diff = _differences(cfg, want)
  if diff:
    raise ValueError(f"the checkpoint's model does not match the base {path}: " + "; ".join(diff))
  arch = conf["architectures"][0]
  conf = dict(conf, architectures=[arch], model_type=MODEL_TYPES[arch], vocab_size=cfg.vocab_size,
              hidden_size=cfg.d_model, intermediate_size=cfg.mlp_dim, num_hidden_layers=cfg.num_layers,
              num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.dim_per_head,
              rms_norm_eps=cfg.rms_eps, rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_embeddings,
              hidden_act=conf.get("hidden_act", "silu"), torch_dtype=dtype)
  conf.pop("dtype", None)
  if arch == "LlamaForCausalLM":
    conf["attention_bias"] = cfg.qkv_bias
  if cfg.sliding_window:
    conf["sliding_window"] = cfg.sliding_window
    if arch == "Qwen2ForCausalLM":
      conf["use_sliding_window"] = True
  if reward_model:
    conf["architectures"] = [arch.replace("ForCausalLM", "ForTokenClassification")]
    conf["num_labels"] = len(LABELS)
    conf["token_classification_bias"] = True
    conf["id2label"] = dict(enumerate(LABELS))
    conf["label2id"] = {name: i for i, name in enumerate(LABELS)}
  return conf


def _tokenizer_files(base: str, out_dir: str) -> None:
  if hf.is_gguf(base):
    from restem_jax import gguf
    gguf.tokenizer(base).save(os.path.join(out_dir, "tokenizer.json"))
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
      json.dump(gguf.tokenizer_config(base), f, indent=1)
    return
  for name in TOKENIZER_FILES:
    if os.path.exists(os.path.join(base, name)):
      shutil.copy(os.path.join(base, name), os.path.join(out_dir, name))


def _generation_config(base: str, conf: dict) -> dict:
  path = os.path.join(base, "generation_config.json")
  if not hf.is_gguf(base) and os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  return {k: conf[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if conf.get(k) is not None}


def write_safetensors(tensors: dict[str, np.ndarray], out_dir: str, max_shard_bytes: int) -> list[str]:
  """model.safetensors, or shards model-0000i-of-0000n.safetensors with an index when larger."""
  from safetensors.numpy import save_file
  shards, size = [{}], 0
  for name, w in tensors.items():
    if shards[-1] and size + w.nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][name] = w
    size += w.nbytes
  if len(shards) == 1:
    save_file(shards[0], os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    return ["model.safetensors"]
  names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
  weight_map = {}
  for fn, shard in zip(names, shards):
    save_file(shard, os.path.join(out_dir, fn), metadata={"format": "pt"})
    weight_map.update({t: fn for t in shard})
  with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": int(sum(w.nbytes for w in tensors.values()))},
               "weight_map": weight_map}, f, indent=1)
  return names


def to_hf_folder(params, cfg: model_lib.ModelConfig, out_dir: str, base: str, dtype: str = "float32",
                 reward_model: bool = False, max_shard_bytes: int = 2 << 30) -> str:
  """Writes `out_dir` as a Hugging Face model folder; `params` are a decoder's (a
  reward model's {"decoder", "head"} with `reward_model`)."""
  import ml_dtypes
  conf = hf_config(cfg, base, dtype, reward_model)
  decoder = params["decoder"] if reward_model else params
  tensors = state_dict(decoder, cfg)
  if reward_model:
    tensors.pop("lm_head.weight", None)
    tensors["score.weight"] = np.ascontiguousarray(_np(params["head"]["kernel"]).T)
    tensors["score.bias"] = _np(params["head"]["bias"])
  np_dtype = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}.get(dtype)
  if np_dtype is None:
    raise ValueError(f"export: dtype {dtype!r} is not one of float32, bfloat16, float16")
  tensors = {k: v.astype(np_dtype) for k, v in tensors.items()}
  if multihost.is_writer():
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
      json.dump(conf, f, indent=1)
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
      json.dump(_generation_config(base, conf), f, indent=1)
    write_safetensors(tensors, out_dir, max_shard_bytes)
    _tokenizer_files(base, out_dir)
  multihost.barrier("export written")
  return out_dir


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
  """llama.cpp's row order of a q/k projection: rotary halves -> interleaved pairs
  (the inverse of `gguf._unpermute`)."""
  half = w.shape[0] // n_head // 2
  return w.reshape(n_head, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_GGUF_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
               "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down"}


def _gguf_name(name: str) -> str:
  top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
         "lm_head.weight": "output.weight"}
  if name in top:
    return top[name]
  _, _, layer, rest = name.split(".", 3)
  part, kind = rest.rsplit(".", 1)
  return f"blk.{layer}.{_GGUF_NAMES[part]}.{kind}"


def _tokenizer_metadata(base: str) -> dict:
  """The base's byte-level BPE vocabulary as GGUF fields (tokenizer.ggml.*)."""
  if hf.is_gguf(base):
    from restem_jax import gguf
    md = gguf.metadata(base)
    return {k: v for k, v in md.items() if k.startswith("tokenizer.")}
  from restem_jax import gguf
  path = os.path.join(base, "tokenizer.json")
  with open(path) as f:
    tok = json.load(f)
  if (tok.get("model") or {}).get("type") != "BPE":
    raise ValueError(f"{path}: GGUF export needs a byte-level BPE tokenizer (model.type 'BPE')")
  pt = tok.get("pre_tokenizer") or {}
  parts = pt.get("pretokenizers", [pt])
  splits = [p["pattern"].get("Regex") for p in parts if p.get("type") == "Split"]
  if not splits and any(p.get("type") == "ByteLevel" and p.get("use_regex", True) for p in parts):
    splits = gguf.PRE_TOKENIZER_SPLITS["gpt2"]  # ByteLevel's own regex is GPT-2's
  pre = next((name for name, regs in gguf.PRE_TOKENIZER_SPLITS.items() if regs == splits), None)
  if pre is None:
    raise ValueError(f"{path}: its pre-tokenizer splits match none that llama.cpp names here "
                     f"({sorted(gguf.PRE_TOKENIZER_SPLITS)}); convert the exported folder with "
                     "llama.cpp's convert_hf_to_gguf.py instead")
  vocab = tok["model"]["vocab"]
  for t in tok.get("added_tokens", []):
    vocab.setdefault(t["content"], t["id"])
  tokens = [None] * (max(vocab.values()) + 1)
  for t, i in vocab.items():
    tokens[i] = t
  special = {t["id"] for t in tok.get("added_tokens", []) if t.get("special")}
  merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
  cfg_path = os.path.join(base, "tokenizer_config.json")
  tcfg = json.load(open(cfg_path)) if os.path.exists(cfg_path) else {}
  md = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": [t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)],
        "tokenizer.ggml.token_type": [3 if i in special else 1 for i in range(len(tokens))],
        "tokenizer.ggml.merges": merges}
  for key, field in (("eos_token", "eos_token_id"), ("bos_token", "bos_token_id"), ("pad_token", "padding_token_id")):
    t = tcfg.get(key)
    t = t.get("content") if isinstance(t, dict) else t
    if t in vocab:
      md[f"tokenizer.ggml.{field}"] = vocab[t]
  if tcfg.get("chat_template"):
    md["tokenizer.chat_template"] = tcfg["chat_template"]
  return md


def to_gguf(params, cfg: model_lib.ModelConfig, out_path: str, base: str, file_type: str = "f16") -> str:
  """Writes a policy as a llama.cpp GGUF file (`file_type` f32, f16 or q8_0)."""
  import gguf as gg
  kinds = {"f32": gg.GGMLQuantizationType.F32, "f16": gg.GGMLQuantizationType.F16,
           "q8_0": gg.GGMLQuantizationType.Q8_0}
  if file_type not in kinds:
    raise ValueError(f"export: GGUF type {file_type!r} is not one of {sorted(kinds)}")
  conf = hf_config(cfg, base, "float32")
  arch = GGUF_ARCH[conf["model_type"]]
  tensors = state_dict(params, cfg)
  if not multihost.is_writer():
    multihost.barrier("gguf written")
    return out_path
  os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
  partial = f"{out_path}.partial"  # renamed when complete: a killed export leaves no half-written file
  w = gg.GGUFWriter(partial, arch)
  # no general.name: transformers' GGUF loader takes a "llama" file whose name says "mistral" for a
  # Mistral architecture it cannot load
  w.add_context_length(int(conf.get("max_position_embeddings", 2048)))
  w.add_embedding_length(cfg.d_model)
  w.add_block_count(cfg.num_layers)
  w.add_feed_forward_length(cfg.mlp_dim)
  w.add_head_count(cfg.num_heads)
  w.add_head_count_kv(cfg.num_kv_heads)
  w.add_rope_dimension_count(cfg.dim_per_head)
  w.add_rope_freq_base(cfg.rope_theta)
  w.add_layer_norm_rms_eps(cfg.rms_eps)
  w.add_vocab_size(cfg.vocab_size)
  w.add_file_type({"f32": 0, "f16": 1, "q8_0": 7}[file_type])  # llama.cpp's LLAMA_FTYPE_*
  if cfg.sliding_window:
    w.add_sliding_window(cfg.sliding_window)
  for key, value in _tokenizer_metadata(base).items():
    if isinstance(value, bool):
      w.add_bool(key, value)
    elif isinstance(value, int):
      w.add_uint32(key, value)
    elif isinstance(value, str):
      w.add_string(key, value)
    elif isinstance(value, (list, tuple)) and value:
      w.add_array(key, list(value))
  permute = {"self_attn.q_proj": cfg.num_heads, "self_attn.k_proj": cfg.num_kv_heads} if arch == "llama" else {}
  for name, t in tensors.items():
    for part, heads in permute.items():
      if f".{part}." in name:
        t = _permute(t, heads)
    kind = kinds[file_type] if t.ndim == 2 else gg.GGMLQuantizationType.F32  # llama.cpp keeps norms, biases f32
    if kind == gg.GGMLQuantizationType.Q8_0 and t.shape[-1] % 32:
      kind = gg.GGMLQuantizationType.F16
    data = t.astype(np.float16) if kind == gg.GGMLQuantizationType.F16 else t.astype(np.float32)
    if kind == gg.GGMLQuantizationType.Q8_0:
      data = gg.quants.quantize(data, kind)
    w.add_tensor(_gguf_name(name), data, raw_dtype=kind if kind == gg.GGMLQuantizationType.Q8_0 else None)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  os.replace(partial, out_path)
  multihost.barrier("gguf written")
  return out_path


def load(checkpoint: str, base: str = "", reward_model: bool = False, mesh=None):
  """(ModelConfig, params) of `checkpoint` with the base's architecture."""
  from restem_jax import checkpoints, reward
  from restem_jax.files import absolute
  checkpoint, base = absolute(checkpoint), absolute(base)
  if not base:
    if not (hf.is_gguf(checkpoint) or os.path.exists(os.path.join(checkpoint, "config.json"))):
      raise ValueError(f"{checkpoint}: a training folder holds no architecture or tokenizer: give --base "
                       "(the Hugging Face folder or .gguf file the run started from)")
    base = checkpoint
  cfg = hf.load_config(base)
  init = reward.init_params if reward_model else model_lib.init_params
  try:
    params = checkpoints.load_params(checkpoint, cfg, mesh, init=init)
  except ValueError as e:  # orbax: shapes that do not fit the base's architecture
    raise ValueError(f"{checkpoint}: its tensors do not fit the base {base} ({e})") from None
  return cfg, params, base


def export(checkpoint: str, out: str = "", base: str = "", dtype: str = "float32", gguf_out: str = "",
           gguf_type: str = "f16", reward_model: bool = False) -> dict:
  """Exports `checkpoint` to a Hugging Face folder `out` and/or a GGUF file `gguf_out`."""
  if not out and not gguf_out:
    raise ValueError("export: give an output folder (out) or a GGUF file (gguf_out)")
  cfg, params, base = load(checkpoint, base, reward_model)
  written = {}
  if out:
    written["hf_folder"] = to_hf_folder(params, cfg, out, base, dtype, reward_model)
  if gguf_out:
    if reward_model:
      raise ValueError("export: a reward model exports to a Hugging Face folder only (llama.cpp has no "
                       "token-classification head)")
    written["gguf"] = to_gguf(params, cfg, gguf_out, base, gguf_type)
  return written


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--checkpoint", required=True, help="training folder, Hugging Face folder or .gguf")
  ap.add_argument("--out", default="", help="the Hugging Face folder to write")
  ap.add_argument("--base", default="", help="the model the run started from (folder or .gguf)")
  ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
  ap.add_argument("--gguf", default="", help="the GGUF file to write")
  ap.add_argument("--gguf_type", default="f16", choices=["f32", "f16", "q8_0"])
  ap.add_argument("--reward_model", action="store_true", help="an ORM/PRM folder (token classification)")
  a = ap.parse_args(argv)
  print(json.dumps(export(a.checkpoint, a.out, a.base, a.dtype, a.gguf, a.gguf_type, a.reward_model), indent=1))


if __name__ == "__main__":
  main()
