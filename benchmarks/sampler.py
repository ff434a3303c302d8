"""Sampler throughput: ours vs transformers `generate` (PyTorch CPU, KV cache on).

1. Same random ~20M-parameter Llama weights (created with transformers, imported
   with restem_jax.hf), same 32 prompts x 4 samples, 64 new tokens, temperature
   0.7, top-k 40, no EOS (every row generates all 64 tokens).
2. The real model at an E-step shape: SmolLM2-135M-Instruct (GGUF, the same
   de-quantised weights in both), 32 GSM8K test prompts in its chat template x 8
   samples (256 rows), 128 new tokens, T=0.7, top-k 40, stopping at EOS. Useful
   tokens (up to and including EOS) per second of each, their ratio, and the
   fraction of the compute roofline: 2 x params x useful tokens / the float32
   matmul peak measured in this run, over the wall time.
Usage: python benchmarks/sampler.py [--prompts 32] [--samples 4] [--new 64] [--size 20m|1b] [--skip_real]
"""
import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402
from restem_jax import hf, partitioning, sampling  # noqa: E402


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--prompts", type=int, default=32)
  ap.add_argument("--samples", type=int, default=4)
  ap.add_argument("--new", type=int, default=64)
  ap.add_argument("--size", default="20m", choices=["20m", "1b"])
  ap.add_argument("--dtype", default="float32")
  ap.add_argument("--skip_hf", action="store_true")
  ap.add_argument("--skip_real", action="store_true")
  ap.add_argument("--real_prompts", type=int, default=32)
  ap.add_argument("--real_samples", type=int, default=8)
  ap.add_argument("--real_new", type=int, default=128)
  args = ap.parse_args()
  import torch
  import transformers
  hf_cfg = common.LLAMA_20M if args.size == "20m" else common.LLAMA_1B
  torch.manual_seed(0)
  ref = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_cfg)).eval()
  rng = np.random.RandomState(0)
  prompts = [list(rng.randint(3, hf_cfg["vocab_size"], rng.randint(16, 49))) for _ in range(args.prompts)]
  n_tokens = args.prompts * args.samples * args.new

  with tempfile.TemporaryDirectory() as d:
    ref.save_pretrained(d, safe_serialization=True)
    mesh = partitioning.make_mesh()
    cfg, params = hf.load(d, mesh=mesh, dtype=args.dtype)
  print(f"model: {cfg.num_params() / 1e6:.1f}M parameters, devices: {jax.devices()}")
  sc = sampling.SamplingConfig(num_samples=args.samples, max_new_tokens=args.new, temperature=0.7, top_k=40)
  kw = dict(eos_id=-1, batch_size=args.prompts, mesh=mesh)
  with jax.set_mesh(mesh):
    import time
    t0 = time.perf_counter()
    sampling.sample(cfg, params, prompts, sc, rng=0, **kw)
    compile_s = time.perf_counter() - t0
    ours = common.best_of(lambda: sampling.sample(cfg, params, prompts, sc, rng=1, **kw), 3)
  ours_tps = n_tokens / ours
  print(f"ours: {ours:.2f} s for {n_tokens} tokens = {ours_tps:.0f} tokens/s (first call incl. compile {compile_s:.1f} s)")

  hf_tps = None
  if not args.skip_hf:
    width = max(map(len, prompts))
    ids = torch.zeros((args.prompts, width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):  # left padding, as generate expects
      ids[i, width - len(p):] = torch.tensor(p)
      mask[i, width - len(p):] = 1
    ref.generation_config.eos_token_id = None
    ref.generation_config.pad_token_id = 0

    def run_hf():
      with torch.no_grad():
        ref.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=0.7, top_k=40,
                     max_new_tokens=args.new, min_new_tokens=args.new,
                     num_return_sequences=args.samples, use_cache=True)
    run_hf()
    theirs = common.best_of(run_hf, 2)
    hf_tps = n_tokens / theirs
    print(f"transformers generate (torch {torch.__version__}, {torch.get_num_threads()} threads): "
          f"{theirs:.2f} s = {hf_tps:.0f} tokens/s")
  result = dict(ours_tokens_per_s=round(ours_tps, 1),
                hf_tokens_per_s=None if hf_tps is None else round(hf_tps, 1),
                ratio=None if hf_tps is None else round(ours_tps / hf_tps, 2),
                params_m=round(cfg.num_params() / 1e6, 1), device=str(jax.devices()[0].platform))
  if not args.skip_real:
    result.update(real_model(args))
  print(json.dumps(result))


def real_model(args) -> dict:
  """SmolLM2-135M-Instruct on GSM8K chat prompts: ours vs generate, and the roofline."""
  import time
  import torch
  import transformers
  import tasks
  from benchmarks.train_step import matmul_peak
  from restem_jax import gguf, vocab
  path = gguf.smollm2_path()
  cfg, params = hf.load(path)
  v = vocab.HFTokenizerVocabulary(path)
  task = tasks.chat(tasks.get("gsm8k"), v, tasks.ChatFormat(
      instruction="\nSolve it step by step, then give the final answer as: #### <number>"))
  prompts = [v.encode(r["prompt"]) for r in task.load("test")[:args.real_prompts]]
  n, new = args.real_samples, args.real_new
  peak = max(matmul_peak(np.float32, 2048) for _ in range(2)) / 1e9  # GFLOP/s
  sc = sampling.SamplingConfig(num_samples=n, temperature=0.7, top_k=40, max_new_tokens=new)
  kw = dict(eos_id=v.eos_id, batch_size=len(prompts))
  t0 = time.perf_counter()
  sampling.sample(cfg, params, prompts, sc, rng=0, **kw)  # compiles (and runs once)
  first = time.perf_counter() - t0
  t0 = time.perf_counter()
  out = sampling.sample(cfg, params, prompts, sc, rng=1, **kw)
  ours = time.perf_counter() - t0
  ours_tokens = int(out.lengths.sum())
  print(f"real model: {cfg.num_params() / 1e6:.0f}M parameters, {len(prompts)} prompts x {n} samples, "
        f"{new} new tokens; ours {ours:.1f} s (second call; the first, compiling, took {first:.0f} s) "
        f"for {ours_tokens} useful tokens = {ours_tokens / ours:.0f} tokens/s")
  ref = transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()
  width = max(map(len, prompts))
  ids = torch.zeros((len(prompts), width), dtype=torch.long)
  mask = torch.zeros_like(ids)
  for i, p in enumerate(prompts):
    ids[i, width - len(p):] = torch.tensor(p)
    mask[i, width - len(p):] = 1
  torch.manual_seed(0)
  t0 = time.perf_counter()
  with torch.no_grad():
    gen = ref.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=0.7, top_k=40,
                       max_new_tokens=new, num_return_sequences=n, eos_token_id=v.eos_id,
                       pad_token_id=v.eos_id)[:, width:].numpy()
  theirs = time.perf_counter() - t0
  ended = (gen == v.eos_id)
  hf_tokens = int(np.where(ended.any(1), ended.argmax(1) + 1, gen.shape[1]).sum())
  print(f"transformers generate: {theirs:.1f} s for {hf_tokens} useful tokens = {hf_tokens / theirs:.0f} tokens/s")
  flops = 2 * cfg.num_params()
  ours_tps, hf_tps = ours_tokens / ours, hf_tokens / theirs
  print(f"ratio {ours_tps / hf_tps:.2f}; roofline fraction ours {flops * ours_tps / (peak * 1e9):.3f}, "
        f"transformers {flops * hf_tps / (peak * 1e9):.3f} (float32 matmul peak {peak:.0f} GFLOP/s)")
  return dict(real_ours_tokens_per_s=round(ours_tps, 1), real_hf_tokens_per_s=round(hf_tps, 1),
              real_ratio=round(ours_tps / hf_tps, 2),
              real_roofline_fraction=round(flops * ours_tps / (peak * 1e9), 3),
              real_hf_roofline_fraction=round(flops * hf_tps / (peak * 1e9), 3), peak_gflops=round(peak, 1))


if __name__ == "__main__":
  main()
