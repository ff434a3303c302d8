"""Logit and greedy-generation parity with transformers (PyTorch, float32)."""
import numpy as np
import pytest
import torch
import transformers

import jax
import jax.numpy as jnp

from conftest import assert_close, assert_greedy_like_transformers
from restem_jax import hf, model, partitioning

# float32 logits of a 2-layer model from PyTorch's kernels and XLA's: ~20 sequential reductions of
# <= 96 terms, each ~sqrt(96) eps of its scale, so 256 eps of the largest logit.  A wrong rotary
# layout, bias or window moves logits by 1e-2 of their scale or more.
PARITY_ULPS = 256

BASE = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            initializer_range=0.3, rms_norm_eps=1e-6)
CASES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
              dict(rope_theta=10000.0, tie_word_embeddings=False)),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM,
              dict(rope_theta=1e6, tie_word_embeddings=True)),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM,
                dict(rope_theta=10000.0, sliding_window=12, num_key_value_heads=1)),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def tiny(request, tmp_path_factory):
  cfg_cls, model_cls, extra = CASES[request.param]
  torch.manual_seed(0)
  hf_model = model_cls(cfg_cls(**{**BASE, **extra})).eval()
  if request.param == "qwen2":  # make the qkv biases non-trivial
    with torch.no_grad():
      for layer in hf_model.model.layers:
        for p in (layer.self_attn.q_proj.bias, layer.self_attn.k_proj.bias, layer.self_attn.v_proj.bias):
          p.normal_(0, 0.3)
  d = tmp_path_factory.mktemp(request.param)
  hf_model.save_pretrained(d, safe_serialization=True)
  cfg, params = hf.load(str(d))
  return request.param, hf_model, cfg, params


def test_config_mapping(tiny):
  name, _, cfg, _ = tiny
  assert cfg.num_kv_heads == (1 if name == "mistral" else 2)
  assert cfg.qkv_bias == (name == "qwen2")
  assert cfg.tie_embeddings == (name == "qwen2")
  assert cfg.sliding_window == (12 if name == "mistral" else None)


def test_logit_parity(tiny):
  _, hf_model, cfg, params = tiny
  tokens = np.random.RandomState(1).randint(0, 97, (3, 40))
  with torch.no_grad():
    ref = hf_model(torch.tensor(tokens)).logits.numpy()
  ours, _ = model.apply(cfg, params, jnp.asarray(tokens))
  assert_close(ours, ref, PARITY_ULPS)


def test_greedy_generation_matches(tiny):
  _, hf_model, cfg, params = tiny
  assert_greedy_like_transformers(hf_model, cfg, params, np.random.RandomState(2).randint(0, 97, 7).tolist(),
                                  PARITY_ULPS)


def test_loaded_directly_sharded(tiny, tmp_path):
  name, hf_model, _, _ = tiny
  hf_model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="20KB")
  assert (tmp_path / "model.safetensors.index.json").exists()
  mesh = partitioning.make_mesh((2, 2, 2))
  cfg, params = hf.load(str(tmp_path), mesh=mesh)
  q = params["layer_0"]["attn"]["q_proj"]
  assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)
  assert len({str(s.index) for s in q.addressable_shards}) == 4
  assert q.addressable_shards[0].data.shape == (cfg.d_model // 2, cfg.num_heads // 2, cfg.dim_per_head)
  tokens = np.random.RandomState(1).randint(0, 97, (2, 16))
  with torch.no_grad():
    ref = hf_model(torch.tensor(tokens)).logits.numpy()
  ours, _ = model.apply(cfg, params, jnp.asarray(tokens))
  assert_close(ours, ref, PARITY_ULPS)


def test_bad_config_is_named(tmp_path):
  (tmp_path / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"]}')
  with pytest.raises(ValueError, match="config.json.*architectures"):
    hf.load_config(str(tmp_path))
  (tmp_path / "config.json").write_text('{"architectures": ["LlamaForCausalLM"],\n "vocab_size": }')
  with pytest.raises(ValueError, match="config.json: line 2"):
    hf.load_config(str(tmp_path))


def test_hf_tokenizer_vocabulary(tmp_path):
  import json as json_lib
  import tokenizers
  from tokenizers import models, pre_tokenizers, trainers
  from restem_jax import vocab
  tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = __import__("tokenizers").decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "</s>", "<unk>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(["the answer is 42", "1+2=3 and 3*4=12"] * 50, trainer)
  tok.save(str(tmp_path / "tokenizer.json"))
  (tmp_path / "tokenizer_config.json").write_text(json_lib.dumps({"eos_token": "</s>"}))
  v = vocab.HFTokenizerVocabulary(str(tmp_path))
  assert v.eos_id == tok.token_to_id("</s>")
  ids = v.encode("the answer is 42")
  assert ids and v.decode(ids) == "the answer is 42"
  assert v.decode(ids + [v.eos_id]) == "the answer is 42"  # special tokens dropped
  (tmp_path / "tokenizer_config.json").write_text(json_lib.dumps({"eos_token": "<nope>"}))
  with pytest.raises(ValueError, match="eos_token"):
    vocab.HFTokenizerVocabulary(str(tmp_path))


def test_broken_safetensors_are_named(tiny, tmp_path):
  """A truncated shard names the file and the tensor; a missing shard names the index and the file."""
  _, hf_model, cfg, _ = tiny
  hf_model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="20KB")
  shards = sorted(p for p in tmp_path.iterdir() if p.suffix == ".safetensors")
  last = shards[-1]
  data = last.read_bytes()
  last.write_bytes(data[:len(data) - 100])
  with pytest.raises(ValueError, match=rf"{last.name}: tensor '.*' lies at bytes .* past the end of the file"):
    hf.load(str(tmp_path))
  last.write_bytes(data[:5])
  with pytest.raises(ValueError, match=rf"{last.name}: truncated safetensors file \(5 bytes"):
    hf.load(str(tmp_path))
  last.unlink()
  with pytest.raises(FileNotFoundError, match=rf"model.safetensors.index.json: lists shard\(s\) \['{last.name}'\]"):
    hf.load(str(tmp_path))
  (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": ')
  with pytest.raises(ValueError, match="model.safetensors.index.json: line 1: invalid JSON"):
    hf.load(str(tmp_path))
