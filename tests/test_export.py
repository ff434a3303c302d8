"""Export to a Hugging Face folder and to GGUF: round trips through transformers
and through our own loader, for tiny random Llama / Qwen2 / Mistral models whose
weights were changed after import.  SmolLM2 after an M-step: tests/test_real_model.py."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from conftest import ROOT, assert_close, assert_greedy_like_transformers, make_bpe_vocab, subprocess_env
from restem_jax import export, hf, model, reward

# float32 logits of a 2-layer model from PyTorch's kernels and XLA's (as tests/test_hf_parity.py):
# ~20 sequential reductions of <= 96 terms, each ~sqrt(96) eps of its scale: 256 eps of the largest logit.
PARITY_ULPS = 256
BASE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.3, rms_norm_eps=1e-6)
CASES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(tie_word_embeddings=False)),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM,
              dict(rope_theta=1e6, tie_word_embeddings=True)),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM,
                dict(sliding_window=12, num_key_value_heads=1)),
}


def _perturbed(params, scale=0.05, seed=3):
  """The parameters after an 'update': every tensor moved, so nothing equals the base."""
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(tree, [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])


def _base_folder(name, d):
  """A tiny random `name` model saved by transformers in folder d, with a real
  byte-level BPE tokenizer."""
  cfg_cls, model_cls, extra = CASES[name]
  v = make_bpe_vocab(d)
  torch.manual_seed(0)
  base = model_cls(cfg_cls(**{**BASE, **extra, "vocab_size": v.vocab_size, "eos_token_id": v.eos_id})).eval()
  base.save_pretrained(d, safe_serialization=True)
  return str(d)


@pytest.fixture(scope="module", params=sorted(CASES))
def tiny(request, tmp_path_factory):
  """(name, base folder, config, params changed after import)."""
  d = _base_folder(request.param, tmp_path_factory.mktemp(request.param))
  cfg, params = hf.load(d)
  return request.param, d, cfg, _perturbed(params)


def _tokens(vocab_size, shape, seed=1):
  return np.random.RandomState(seed).randint(0, vocab_size, shape)


def test_hf_folder_round_trip(tiny, tmp_path):
  name, base, cfg, params = tiny
  out = export.to_hf_folder(params, cfg, str(tmp_path / "out"), base)
  cfg2, params2 = hf.load(out)  # our loader: the same config, the same float32 tensors
  assert cfg2 == cfg
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params2, params)
  assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
          "tokenizer_config.json"} <= set(os.listdir(out))
  theirs = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  assert type(theirs).__name__ == {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                                   "mistral": "MistralForCausalLM"}[name]
  tokens = _tokens(cfg.vocab_size, (3, 40))
  with torch.no_grad():
    want = theirs(torch.tensor(tokens)).logits.numpy()
  got = np.asarray(model.apply(cfg, params, jnp.asarray(tokens))[0])
  assert_close(got, want, PARITY_ULPS)
  assert np.abs(got - want).max() <= 1e-4  # the bound, in float32
  assert_greedy_like_transformers(theirs, cfg, params, _tokens(cfg.vocab_size, (7,), seed=2).tolist(), PARITY_ULPS)


def test_sharded_and_bfloat16_folders(tiny, tmp_path):
  _, base, cfg, params = tiny
  out = export.to_hf_folder(params, cfg, str(tmp_path / "sharded"), base, max_shard_bytes=40_000)
  with open(os.path.join(out, "model.safetensors.index.json")) as f:
    assert len(set(json.load(f)["weight_map"].values())) > 1
  _, params2 = hf.load(out)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params2, params)
  out = export.to_hf_folder(params, cfg, str(tmp_path / "bf16"), base, dtype="bfloat16")
  with open(os.path.join(out, "config.json")) as f:
    assert json.load(f)["torch_dtype"] == "bfloat16"
  _, params3 = hf.load(out)  # each value rounded to bfloat16: within half its 2^-8 spacing
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2 ** -8, atol=0),
               params3, params)


# Our q8_0 bound: blocks of 32 values share a float16 scale max|x|/127, so a value moves by at most
# half a step plus the scale's own float16 rounding (2^-11 relative, times 127 steps).
Q8_BOUND = lambda block_max: block_max / 127 * (0.5 + 127 * 2 ** -11)  # noqa: E731


def test_a_gguf_written_again_at_the_same_path_is_read_again(tiny, tmp_path):
  """The GGUF reader is cached per file version: an export written again at the same
  path (f32, then f16) reads back as the new file, not the one read first."""
  name, base, cfg, params = tiny
  path = str(tmp_path / f"{name}.gguf")
  export.to_gguf(params, cfg, path, base, "f32")
  _, first = hf.load(path)
  export.to_gguf(params, cfg, path, base, "f16")
  _, second = hf.load(path)
  rounded = 0
  for w, a, b in zip(jax.tree.leaves(params), jax.tree.leaves(first), jax.tree.leaves(second)):
    w, a, b = np.asarray(w), np.asarray(a), np.asarray(b)
    np.testing.assert_array_equal(a, w)  # the f32 file, still as read after the second export
    if not np.array_equal(b, w):  # matrices are f16 in the second file (norms, biases stay f32)
      np.testing.assert_array_equal(b, w.astype(np.float16).astype(np.float32))
      rounded += 1
  assert rounded


@pytest.mark.parametrize("file_type", ["f32", "f16", "q8_0"])
def test_gguf_round_trip(tiny, file_type, tmp_path):
  name, base, cfg, params = tiny
  path = export.to_gguf(params, cfg, str(tmp_path / f"{name}.gguf"), base, file_type)
  cfg2, params2 = hf.load(path)  # our own GGUF reader
  assert cfg2 == cfg or (name == "mistral" and cfg2 == cfg.__class__(**{**cfg.__dict__, "sliding_window": None}))
  for (p, a), b in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(params2)):
    a, b = np.asarray(a), np.asarray(b)
    if file_type == "f32" or a.ndim == 1 or "norm" in jax.tree_util.keystr(p):
      np.testing.assert_array_equal(b, a)
    elif file_type == "f16":
      np.testing.assert_allclose(b, a, rtol=2 ** -11, atol=2 ** -24)
    else:
      assert np.abs(b - a).max() <= Q8_BOUND(np.abs(a).max()), jax.tree_util.keystr(p)
  theirs = transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()
  # llama.cpp runs Mistral as "llama" without the window: compare within it
  tokens = _tokens(cfg.vocab_size, (3, 12 if name == "mistral" else 40))
  with torch.no_grad():
    want = theirs(torch.tensor(tokens)).logits.numpy()
  got = np.asarray(model.apply(cfg2, params2, jnp.asarray(tokens))[0])
  assert_close(got, want, PARITY_ULPS)  # the same de-quantised weights on both sides


def test_reward_model_exports_as_token_classification(tiny, tmp_path):
  _, base, cfg, params = tiny
  rm = reward.from_decoder(cfg, params, jax.random.key(5))
  out = export.to_hf_folder(rm, cfg, str(tmp_path / "rm"), base, reward_model=True)
  theirs = transformers.AutoModelForTokenClassification.from_pretrained(out, dtype=torch.float32).eval()
  assert theirs.config.id2label == {0: "NEGATIVE", 1: "NEUTRAL", 2: "POSITIVE"}
  tokens = _tokens(cfg.vocab_size, (2, 30))
  with torch.no_grad():
    want = theirs(torch.tensor(tokens)).logits.numpy()
  got = np.asarray(reward.apply(cfg, rm, jnp.asarray(tokens)))
  assert_close(got, want, PARITY_ULPS)
  # the README's snippet gives the project's ORM and PRM scores
  prompt, completion = tokens[0, :10].tolist(), tokens[0, 10:].tolist()
  steps = (4, 11, 19)  # the steps' last completion tokens
  want_orm, _ = reward.scores(cfg, rm, [reward.orm_example(prompt, completion, None)], "orm", max_len=32)
  want_prm, _ = reward.scores(cfg, rm, [reward.Labelled(tuple(prompt), tuple(completion), steps, (-1,) * 3)],
                              "prm", max_len=32)
  with torch.no_grad():
    p = theirs(torch.tensor([prompt + completion])).logits.softmax(-1)[0]
  orm = float(p[-1, 2])
  prm = float((p[[len(prompt) + i for i in steps], 2] + p[[len(prompt) + i for i in steps], 1]).prod())
  # logits agree within 256 eps of their largest magnitude, which moves a probability by at most
  # twice that relative; a product of 3 steps by 6 times
  bound = PARITY_ULPS * np.finfo(np.float32).eps * np.abs(want).max()
  assert abs(orm - want_orm[0]) <= 2 * bound * want_orm[0]
  assert abs(prm - want_prm[0]) <= 6 * bound * want_prm[0]


def test_a_checkpoint_that_does_not_fit_the_base_is_refused(tiny, tmp_path):
  _, base, cfg, params = tiny
  other = cfg.__class__(**{**cfg.__dict__, "num_layers": 1})
  with pytest.raises(ValueError, match=r"does not match the base .*num_layers: 1 vs 2"):
    export.to_hf_folder({k: v for k, v in params.items() if k != "layer_1"}, other, str(tmp_path / "x"), base)
  with pytest.raises(ValueError, match="give --base"):
    export.load(str(tmp_path / "not_a_model_folder"))


MULTIHOST = """
import sys
from restem_jax import multihost, partitioning
multihost.initialize(sys.argv[1], 2, int(sys.argv[2]))
import jax
from restem_jax import export, hf
base, out = sys.argv[3], sys.argv[4] + f"/process_{jax.process_index()}"
mesh = partitioning.make_mesh((1, 2, 4))  # fsdp across the two processes, tensor within each
cfg = hf.load_config(base)
params = jax.jit(lambda p: jax.tree.map(lambda x: -x, p))(hf.load_params(base, cfg, mesh))  # moved
split = sum(not (x.is_fully_addressable or x.sharding.is_fully_replicated) for x in jax.tree.leaves(params))
export.to_hf_folder(params, cfg, out + "/hf", base)
export.to_gguf(params, cfg, out + "/model.gguf", base, "f32")
print("SPLIT", split)
"""


def test_multihost_export_gathers_every_shard_and_only_process_0_writes(tmp_path):
  """Two JAX processes (gloo) hold the weights split between them: both call the
  exports, process 0 alone writes, and the files hold the whole model."""
  (tmp_path / "base").mkdir()
  base = _base_folder("llama", tmp_path / "base")
  port = 20000 + (os.getpid() + 7) % 20000
  env = dict(subprocess_env(4), JAX_PLATFORMS="cpu")
  procs = [subprocess.Popen([sys.executable, "-c", MULTIHOST, f"127.0.0.1:{port}", str(i), base, str(tmp_path)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
    split = int(out.split("SPLIT ", 1)[1].split()[0])
    assert split > 0, "no parameter was split across the processes: the test would not test gathering"
  assert not (tmp_path / "process_1").exists(), "process 1 wrote files"
  _, want = hf.load(base)
  for path in (tmp_path / "process_0" / "hf", tmp_path / "process_0" / "model.gguf"):
    _, got = hf.load(str(path))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), -np.asarray(b)), got, want)
