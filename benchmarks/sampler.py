"""Sampler throughput: ours vs transformers `generate` (PyTorch CPU, KV cache on).

1. Same random ~20M-parameter Llama weights (created with transformers, imported
   with restem_jax.hf), same 32 prompts x 4 samples, 64 new tokens, temperature
   0.7, top-k 40, no EOS (every row generates all 64 tokens).
2. The real model: SmolLM2-135M-Instruct (its GGUF de-quantised once into a Hugging
   Face folder: the same dense weights on both sides), GSM8K test prompts in its
   chat template x 8 samples, T=0.7, top-k 40, stopping at EOS.  Two shapes:
   "fixed", 32 prompts in one call of 256 rows, <= 128 new tokens (most rows run to
   the cap), against transformers `generate` in float32 and bfloat16 (the fastest
   on a CPU with AMX); "estep", 64 prompts, <= 256 new tokens (variable lengths: rows
   end at EOS from ~60 to 256 tokens), in calls of 32 prompts (256 rows; `--estep_batch`).
   At the estep shape: the loop before finished rows left the batch (`shrink` off:
   fixed batches that wait for their longest row), then `shrink` (finished rows
   leave the batch as it shrinks by eighths), and `generate` in bfloat16 in calls
   of as many prompts; `--refill` adds continuous batching (a pool of 16 prompts'
   rows refilled once over).  Each in useful
   tokens (up to and including EOS) per second and useful-slot fraction (useful
   over computed token slots).  Estep runs are timed once each, less the seconds
   JAX reports compiling (tracing, lowering, XLA) in the call: a real E-step makes
   hundreds of calls and compiles once.  Also the fraction of the compute roofline
   (2 x params x useful tokens/s over the matmul peaks measured in this run,
   float32 and the fastest dtype).
Usage: python benchmarks/sampler.py [--prompts 32] [--samples 4] [--new 64] [--size 20m|1b] [--skip_real]
       [--refill] [--estep_batch 32]
"""
import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
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
  ap.add_argument("--real_batch", type=int, default=32, help="prompts per sampler call (fixed shape)")
  ap.add_argument("--estep_batch", type=int, default=32, help="estep shape: prompts per call")
  ap.add_argument("--refill", action="store_true", help="estep shape: also continuous batching")
  ap.add_argument("--refill_batch", type=int, default=16,
                  help="estep shape with refill: prompts per pool (refilled once over)")
  ap.add_argument("--estep_prompts", type=int, default=64)
  ap.add_argument("--estep_new", type=int, default=256)
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


def matmul_peaks() -> dict:
  """GFLOP/s of a 2048^3 matmul: jax (XLA) and torch, float32 and bfloat16 (best of 5)."""
  import torch
  from benchmarks.train_step import matmul_peak
  out = {f"jax_{d}": max(matmul_peak(jnp.dtype(d), 2048) for _ in range(2)) / 1e9
         for d in ("float32", "bfloat16")}
  for d in ("float32", "bfloat16"):
    a = torch.ones((2048, 2048), dtype=getattr(torch, d))
    a @ a
    out[f"torch_{d}"] = 2 * 2048 ** 3 / common.best_of(lambda: a @ a, 5) / 1e9
  return out


def hf_generate(ref, prompts, n, new, eos_id, batch=None):
  """(seconds, useful tokens) of transformers `generate` over left-padded prompts,
  `batch` prompts a call (all in one call by default)."""
  import time
  import torch
  seconds, useful = 0.0, 0
  batch = batch or len(prompts)
  for start in range(0, len(prompts), batch):
    part = prompts[start:start + batch]
    width = max(map(len, part))
    ids = torch.zeros((len(part), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(part):
      ids[i, width - len(p):] = torch.tensor(p)
      mask[i, width - len(p):] = 1
    torch.manual_seed(start)
    t0 = time.perf_counter()
    with torch.no_grad():
      gen = ref.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=0.7, top_k=40,
                         max_new_tokens=new, num_return_sequences=n, eos_token_id=eos_id,
                         pad_token_id=eos_id)[:, width:].numpy()
    seconds += time.perf_counter() - t0
    ended = gen == eos_id
    useful += int(np.where(ended.any(1), ended.argmax(1) + 1, gen.shape[1]).sum())
  return seconds, useful


class CompileClock:
  """Seconds JAX reports compiling (tracing, lowering to MLIR, XLA) while active."""
  EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
            "/jax/core/compile/backend_compile_duration")

  def __init__(self):
    self.seconds = 0.0
    jax.monitoring.register_event_duration_secs_listener(self._on_event)

  def _on_event(self, event, duration, **_):
    if event in self.EVENTS:
      self.seconds += duration


def real_model(args) -> dict:
  """SmolLM2-135M-Instruct on GSM8K chat prompts: our loops, ours against
  transformers `generate` in bfloat16 and float32, and the roofline."""
  import time
  import torch
  import transformers
  import tasks
  from restem_jax import gguf, vocab
  path = gguf.smollm2_path()
  v = vocab.HFTokenizerVocabulary(path)
  task = tasks.chat(tasks.get("gsm8k"), v, tasks.ChatFormat(
      instruction="\nSolve it step by step, then give the final answer as: #### <number>"))
  test = task.load("test")
  peaks = matmul_peaks()
  print("matmul peaks (2048^3, GFLOP/s): " + ", ".join(f"{k} {x:.0f}" for k, x in peaks.items()))
  with tempfile.TemporaryDirectory() as folder:
    # dense weights for both sides: the GGUF de-quantised once, saved as a Hugging Face folder
    gguf.to_hf_folder(path, folder)
    cfg, params = hf.load(folder)
    refs = {d: transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, d)).eval()
            for d in ("bfloat16", "float32")}
  clock = CompileClock()
  n = args.real_samples

  def ours(prompts, new, loop, batch, warm):
    """(seconds, compile seconds within them, Samples) of one timed call; `warm`: a
    first call that compiles, not timed."""
    sc = sampling.SamplingConfig(num_samples=n, temperature=0.7, top_k=40, max_new_tokens=new,
                                 refill=loop == "refill", shrink=loop == "shrink")
    kw = dict(eos_id=v.eos_id, batch_size=batch)
    if warm:
      sampling.sample(cfg, params, prompts, sc, rng=0, **kw)
    before = clock.seconds
    t0 = time.perf_counter()
    out = sampling.sample(cfg, params, prompts, sc, rng=1, **kw)
    return time.perf_counter() - t0, clock.seconds - before, out

  flops = 2 * cfg.num_params()
  res = {}
  runs = [("fixed", "shrink", args.real_prompts, args.real_new, args.real_batch)]
  runs += [("estep", loop, args.estep_prompts, args.estep_new, args.estep_batch) for loop in ("wait", "shrink")]
  if args.refill:
    runs.append(("estep", "refill", args.estep_prompts, args.estep_new, args.refill_batch))
  for name, loop, np_, new, batch in runs:
    prompts = [v.encode(r["prompt"]) for r in test[:np_]]
    sec, comp, out = ours(prompts, new, loop, batch, warm=name == "fixed")
    tps = int(out.lengths.sum()) / (sec - comp)
    res[name, loop, batch] = (tps, out.useful_fraction())
    print(f"{name}: {np_} prompts x {n} samples, <= {new} new tokens, {batch} prompts a "
          f"{'pool' if loop == 'refill' else 'call'}, loop {loop}: {sec:.1f} s ({comp:.1f} s of it compiling"
          f"{', a second call' if name == 'fixed' else ''}) for {int(out.lengths.sum())} useful tokens = "
          f"{tps:.0f} tokens/s, useful-slot fraction {out.useful_fraction():.3f}", flush=True)
  hf_tps = {}
  if not args.skip_hf:
    for shape, dtypes, np_, new, batch in (("fixed", ("float32", "bfloat16"), args.real_prompts, args.real_new,
                                            args.real_batch),
                                           ("estep", ("bfloat16",), args.estep_prompts, args.estep_new,
                                            args.estep_batch)):
      prompts = [v.encode(r["prompt"]) for r in test[:np_]]
      for d in dtypes:
        sec, toks = hf_generate(refs[d], prompts, n, new, v.eos_id, batch)
        hf_tps[shape, d] = toks / sec
        print(f"transformers generate {d} (torch {torch.__version__}, {torch.get_num_threads()} threads), "
              f"{shape} shape, {batch} prompts a call: {sec:.1f} s for {toks} useful tokens = "
              f"{toks / sec:.0f} tokens/s", flush=True)
  wait = res["estep", "wait", args.estep_batch][0]
  after = res["estep", "shrink", args.estep_batch]
  ours_tps = max(x[0] for k, x in res.items() if k[0] == "estep")  # ours: the fastest loop
  out = dict(estep_useful_slot_fraction=round(after[1], 3),
             estep_useful_slot_fraction_wait=round(res["estep", "wait", args.estep_batch][1], 3),
             estep_shrink_tokens_per_s=round(after[0], 1),
             estep_wait_tokens_per_s=round(wait, 1),
             estep_speedup=round(after[0] / wait, 2),
             real_ours_tokens_per_s=round(ours_tps, 1),
             fixed_useful_slot_fraction=round(res["fixed", "shrink", args.real_batch][1], 3),
             fixed_ours_tokens_per_s=round(res["fixed", "shrink", args.real_batch][0], 1),
             real_roofline_fraction=round(flops * ours_tps / (peaks["jax_float32"] * 1e9), 3),
             **{f"peak_gflops_{k}": round(x, 1) for k, x in peaks.items()})
  if args.refill:
    out.update(estep_refill_tokens_per_s=round(res["estep", "refill", args.refill_batch][0], 1),
               estep_useful_slot_fraction_refill=round(res["estep", "refill", args.refill_batch][1], 3))
  if hf_tps:
    best = max(peaks.values())
    fixed = res["fixed", "shrink", args.real_batch][0]
    out.update(real_hf_bf16_tokens_per_s=round(hf_tps["estep", "bfloat16"], 1),
               real_ratio_hf_bf16=round(ours_tps / hf_tps["estep", "bfloat16"], 2),
               fixed_hf_tokens_per_s=round(hf_tps["fixed", "float32"], 1),
               fixed_hf_bf16_tokens_per_s=round(hf_tps["fixed", "bfloat16"], 1),
               real_ratio=round(fixed / hf_tps["fixed", "float32"], 2),
               fixed_ratio_hf_bf16=round(fixed / hf_tps["fixed", "bfloat16"], 2),
               real_roofline_fraction_of_fastest=round(flops * ours_tps / (best * 1e9), 3),
               real_hf_bf16_roofline_fraction=round(
                   flops * hf_tps["estep", "bfloat16"] / (peaks["torch_bfloat16"] * 1e9), 3))
    print(f"estep shape: ours {ours_tps:.0f} tokens/s = {out['real_ratio_hf_bf16']:.2f}x transformers "
          f"bfloat16; fixed shape: {out['fixed_ratio_hf_bf16']:.2f}x bfloat16, {out['real_ratio']:.2f}x "
          f"float32; roofline fraction ours {out['real_roofline_fraction']:.3f} of the jax float32 peak, "
          f"{out['real_roofline_fraction_of_fastest']:.3f} of the fastest peak ({best:.0f} GFLOP/s)")
  return out


if __name__ == "__main__":
  main()
