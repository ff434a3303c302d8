"""Vocabularies: a Hugging Face `tokenizers` tokenizer as a `seqio.Vocabulary`.

The built-in tiny models use `seqio.ByteVocabulary` (pad 0, EOS 1, bytes + 3).
"""
from __future__ import annotations

import json
import os

import seqio


class HFTokenizerVocabulary(seqio.Vocabulary):
  """tokenizer.json (+ tokenizer_config.json for the EOS token) of a local folder."""

  def __init__(self, model_dir: str, extra_ids: int = 0):
    from tokenizers import Tokenizer
    path = os.path.join(model_dir, "tokenizer.json")
    if not os.path.exists(path):
      raise FileNotFoundError(f"{path}: no tokenizer.json in the model folder")
    self._tok = Tokenizer.from_file(path)
    eos = None
    cfg_path = os.path.join(model_dir, "tokenizer_config.json")
    if os.path.exists(cfg_path):
      with open(cfg_path) as f:
        eos = json.load(f).get("eos_token")
      if isinstance(eos, dict):
        eos = eos.get("content")
    self._eos = self._tok.token_to_id(eos) if eos else None
    if self._eos is None:
      raise ValueError(f"{cfg_path}: field 'eos_token' missing or not in the vocabulary")
    super().__init__(extra_ids=extra_ids)

  @property
  def eos_id(self) -> int:
    return self._eos

  @property
  def unk_id(self):
    return None

  @property
  def _base_vocab_size(self) -> int:
    return self._tok.get_vocab_size()

  def _encode(self, s: str):
    return self._tok.encode(s, add_special_tokens=False).ids

  def _decode(self, ids):
    return self._tok.decode([int(i) for i in ids if int(i) >= 0], skip_special_tokens=True)

  def _encode_tf(self, s):
    import tensorflow as tf
    return tf.ragged.map_flat_values(
        lambda x: tf.py_function(lambda t: tf.constant(self._encode(t.numpy().decode())), [x], tf.int32), s) \
        if isinstance(s, tf.RaggedTensor) else tf.py_function(
            lambda t: tf.constant(self._encode(t.numpy().decode()), tf.int32), [s], tf.int32)

  def _decode_tf(self, ids):
    import tensorflow as tf
    return tf.py_function(lambda t: tf.constant(self._decode(t.numpy().tolist())), [ids], tf.string)

  def __eq__(self, other):
    return isinstance(other, HFTokenizerVocabulary) and other._tok.to_str() == self._tok.to_str()
