"""Vocabularies without TensorFlow: bytes (the built-in models) and a Hugging
Face `tokenizers` tokenizer.  Both have `encode`, `decode` (stops at EOS, drops
special ids), `eos_id`, `pad_id` and `vocab_size`; `tasks.seqio_tasks.to_seqio`
wraps either as a `seqio.Vocabulary` where seqio is installed.
"""
from __future__ import annotations

import json
import os
from typing import Sequence


class ByteVocabulary:
  """UTF-8 bytes shifted by 3 (pad 0, EOS 1, UNK 2): `seqio.ByteVocabulary`'s ids."""
  pad_id, eos_id, unk_id = 0, 1, 2
  vocab_size = 259

  def encode(self, s: str) -> list[int]:
    return [b + 3 for b in s.encode("utf-8")]

  def encode_with_offsets(self, s: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Ids and each id's (start, end) character span in `s`."""
    ids, spans = [], []
    for i, ch in enumerate(s):
      for b in ch.encode("utf-8"):
        ids.append(b + 3)
        spans.append((i, i + 1))
    return ids, spans

  def decode(self, ids: Sequence[int]) -> str:
    out = []
    for i in map(int, ids):
      if i == self.eos_id:
        break
      if 3 <= i < 259:
        out.append(i - 3)
    return bytes(out).decode("utf-8", errors="ignore")

  def __eq__(self, other):
    return isinstance(other, ByteVocabulary)

  def __hash__(self):
    return hash("ByteVocabulary")


class HFTokenizerVocabulary:
  """tokenizer.json + tokenizer_config.json (EOS token, chat template) of a local
  folder, or the tokenizer inside a .gguf file."""
  pad_id = 0

  def __init__(self, model_dir: str):
    from tokenizers import Tokenizer
    self.model_dir = model_dir
    if str(model_dir).endswith(".gguf"):
      from restem_jax import gguf
      self._tok, config, cfg_path = gguf.tokenizer(model_dir), gguf.tokenizer_config(model_dir), model_dir
    else:
      path = os.path.join(model_dir, "tokenizer.json")
      if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no tokenizer.json in the model folder")
      self._tok = Tokenizer.from_file(path)
      cfg_path = os.path.join(model_dir, "tokenizer_config.json")
      config = {}
      if os.path.exists(cfg_path):
        with open(cfg_path) as f:
          config = json.load(f)
    eos = config.get("eos_token")
    if isinstance(eos, dict):
      eos = eos.get("content")
    self.eos_id = self._tok.token_to_id(eos) if eos else None
    if self.eos_id is None:
      raise ValueError(f"{cfg_path}: field 'eos_token' missing or not in the vocabulary")
    self.chat_template = config.get("chat_template")
    self.special_tokens = {k: (v.get("content") if isinstance(v, dict) else v) for k, v in config.items()
                           if k.endswith("_token")}

  def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """The prompt text of `messages` ([{"role", "content"}]) under the tokenizer's
    chat template (jinja2, sandboxed, as transformers renders it)."""
    if not self.chat_template:
      raise ValueError(f"{self.model_dir}: the tokenizer has no chat template")
    import jinja2.sandbox
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = lambda msg: (_ for _ in ()).throw(jinja2.TemplateError(msg))
    return env.from_string(self.chat_template).render(
        messages=messages, add_generation_prompt=add_generation_prompt, **self.special_tokens)

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size()

  def encode(self, s: str) -> list[int]:
    return self._tok.encode(s, add_special_tokens=False).ids

  def encode_with_offsets(self, s: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Ids and each id's (start, end) character span in `s` (the tokenizer's offsets)."""
    enc = self._tok.encode(s, add_special_tokens=False)
    return enc.ids, [tuple(o) for o in enc.offsets]

  def decode(self, ids: Sequence[int]) -> str:
    ids = [int(i) for i in ids]
    if self.eos_id in ids:
      ids = ids[:ids.index(self.eos_id)]
    return self._tok.decode([i for i in ids if 0 <= i < self.vocab_size], skip_special_tokens=True)

  def __eq__(self, other):
    return isinstance(other, HFTokenizerVocabulary) and other._tok.to_str() == self._tok.to_str()

  def __hash__(self):
    return hash(self.model_dir)
