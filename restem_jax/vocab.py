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
  """tokenizer.json (+ tokenizer_config.json for the EOS token) of a local folder."""
  pad_id = 0

  def __init__(self, model_dir: str):
    from tokenizers import Tokenizer
    path = os.path.join(model_dir, "tokenizer.json")
    if not os.path.exists(path):
      raise FileNotFoundError(f"{path}: no tokenizer.json in the model folder")
    self.model_dir = model_dir
    self._tok = Tokenizer.from_file(path)
    eos = None
    cfg_path = os.path.join(model_dir, "tokenizer_config.json")
    if os.path.exists(cfg_path):
      with open(cfg_path) as f:
        eos = json.load(f).get("eos_token")
      if isinstance(eos, dict):
        eos = eos.get("content")
    self.eos_id = self._tok.token_to_id(eos) if eos else None
    if self.eos_id is None:
      raise ValueError(f"{cfg_path}: field 'eos_token' missing or not in the vocabulary")

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size()

  def encode(self, s: str) -> list[int]:
    return self._tok.encode(s, add_special_tokens=False).ids

  def decode(self, ids: Sequence[int]) -> str:
    ids = [int(i) for i in ids]
    if self.eos_id in ids:
      ids = ids[:ids.index(self.eos_id)]
    return self._tok.decode([i for i in ids if 0 <= i < self.vocab_size], skip_special_tokens=True)

  def __eq__(self, other):
    return isinstance(other, HFTokenizerVocabulary) and other._tok.to_str() == self._tok.to_str()

  def __hash__(self):
    return hash(self.model_dir)
