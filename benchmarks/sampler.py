"""Sampler throughput: ours vs transformers `generate` (PyTorch CPU, KV cache on).

Same random ~20M-parameter Llama weights (created with transformers, imported
with restem_jax.hf), same 32 prompts x 4 samples, 64 new tokens, temperature
0.7, top-k 40, no EOS (every row generates all 64 tokens).
Usage: python benchmarks/sampler.py [--prompts 32] [--samples 4] [--new 64] [--size 20m|1b]
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
  print(json.dumps(result))


if __name__ == "__main__":
  main()
