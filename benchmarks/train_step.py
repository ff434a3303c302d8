"""Train-step throughput and model FLOPs utilisation (MFU).

The ~20M-parameter Llama config of benchmarks/sampler.py, batch 16 x 256
tokens, against the float32 matmul peak measured with jax in the same run
(best of several large square matmuls).  MFU counts 6 * N (non-embedding
parameters incl. the output head) + 12 * layers * d_model * seq per token.
With --size smollm2: the real M-step of SmolLM2-135M-Instruct on a GSM8K-shaped
kept set (chat prompt + reference solution + EOS, loss on the solution; the run
file's max_len 448, batch 8 rows, grad_accum 2), one example per row against
packed rows (`training.pack_rows`), in useful (real, not padding) tokens/s:
  python benchmarks/train_step.py --size smollm2
Usage: python benchmarks/train_step.py [--batch 16] [--seq 256] [--size 20m|1b|smollm2] [--dtype float32]
"""
import argparse
import functools
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402
from restem_jax import examples, model, partitioning, training  # noqa: E402


def matmul_peak(dtype, n: int) -> float:
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda x, y: x @ y)
  jax.block_until_ready(f(a, a))
  t = common.best_of(lambda: jax.block_until_ready(f(a, a)), 5)
  return 2 * n ** 3 / t


def timed_steps(cfg, tc, mesh, params, batch, steps):
  """(median step seconds, first step incl. compile seconds, last metrics)."""
  with jax.set_mesh(mesh):
    state, shardings = training.create_state(functools.partial(model.init_params, cfg), tc, mesh,
                                             params=params)
    step = training.jit_train_step(training.nll_loss(cfg), tc, mesh, shardings)
    batch = jax.device_put(batch, training.batch_sharding(mesh))
    t0 = time.perf_counter()
    state, m = step(state, batch)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(steps):
      t = time.perf_counter()
      state, m = step(state, batch)
      jax.block_until_ready(m)
      times.append(time.perf_counter() - t)
  return float(np.median(times)), compile_s, m


def smollm2_mstep(args, mesh):
  """The real M-step: SmolLM2-135M-Instruct on GSM8K chat prompts + reference solutions
  (a kept set's shape), one example per row against packed rows."""
  import tasks
  from restem_jax import gguf, hf, vocab
  path = gguf.smollm2_path()
  cfg, params = hf.load(path, mesh=mesh, dtype=args.dtype, remat=args.remat)
  v = vocab.HFTokenizerVocabulary(path)
  task = tasks.chat(tasks.get("gsm8k"), v, tasks.ChatFormat(
      instruction="\nSolve it step by step, then give the final answer on its own line as: #### <number>"))
  rows = task.load("train")[:args.examples]
  data = examples.policy_examples([v.encode(r["prompt"]) for r in rows], [v.encode(r["solution"]) for r in rows],
                                [1.0] * len(rows), v.eos_id, args.seq)
  print(f"model {cfg.num_params() / 1e6:.1f}M params, {len(data['tokens'])} GSM8K chat examples of "
        f"{len(rows)} (<= {args.seq} tokens), batch {args.batch} rows x {args.seq}, grad_accum "
        f"{args.grad_accum}, {args.dtype}, device {jax.devices()[0].device_kind}")
  result = {}
  for pack in (False, True):
    tc = training.TrainConfig(batch_size=args.batch, grad_accum=args.grad_accum, warmup_steps=1,
                              total_steps=1000, pack=pack)
    rows_data = training.prepare(data, tc)
    batch = training.batch_for_step(rows_data, 0, args.batch, 0)
    dt, compile_s, m = timed_steps(cfg, tc, mesh, params, batch, args.steps)
    real = training.useful_fraction(batch) * batch["tokens"].size
    name = "packed" if pack else "one per row"
    print(f"{name}: {len(rows_data['tokens'])} rows, useful-token fraction "
          f"{training.useful_fraction(rows_data):.3f} (this batch {real / batch['tokens'].size:.3f}); "
          f"step {dt:.1f} s (median of {args.steps}; first incl. compile {compile_s:.0f} s) = "
          f"{real / dt:.0f} useful tokens/s, {batch['tokens'].size / dt:.0f} computed tokens/s, "
          f"loss {float(m['loss']):.3f}")
    result[pack] = (real / dt, training.useful_fraction(rows_data))
  print(json.dumps(dict(mstep_useful_fraction=round(result[True][1], 4),
                        mstep_unpacked_useful_fraction=round(result[False][1], 4),
                        mstep_packed_useful_tokens_per_s=round(result[True][0], 1),
                        mstep_unpacked_useful_tokens_per_s=round(result[False][0], 1),
                        mstep_packed_speedup=round(result[True][0] / result[False][0], 2))))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--seq", type=int, default=256)
  ap.add_argument("--size", default="20m", choices=["20m", "1b", "smollm2"],
                  help="smollm2: the real SmolLM2-135M-Instruct (GGUF) on GSM8K chat text")
  ap.add_argument("--grad_accum", type=int, default=1)
  ap.add_argument("--dtype", default="float32")
  ap.add_argument("--remat", action="store_true")
  ap.add_argument("--steps", type=int, default=5)
  ap.add_argument("--examples", type=int, default=500, help="smollm2: GSM8K train problems in the set")
  args = ap.parse_args()
  mesh = partitioning.make_mesh()
  if args.size == "smollm2":
    if "--seq" not in sys.argv:
      args.seq = 448
    if "--batch" not in sys.argv:
      args.batch, args.grad_accum = 8, 2
    if "--steps" not in sys.argv:
      args.steps = 3
    return smollm2_mstep(args, mesh)
  hf_cfg = common.LLAMA_20M if args.size == "20m" else common.LLAMA_1B
  cfg = common.our_config(hf_cfg, dtype=args.dtype, remat=args.remat)
  rng = np.random.RandomState(0)
  batch = dict(tokens=rng.randint(3, cfg.vocab_size, (args.batch, args.seq + 1)).astype(np.int32),
               loss_mask=np.ones((args.batch, args.seq + 1), np.int32),
               weight=np.ones(args.batch, np.float32))
  tc = training.TrainConfig(batch_size=args.batch, grad_accum=args.grad_accum, warmup_steps=1,
                            total_steps=1000)
  n_matmul = 4096 if jax.default_backend() != "cpu" else 2048
  peak = max(matmul_peak(jnp.dtype(args.dtype), n_matmul) for _ in range(2))
  dt, compile_s, m = timed_steps(cfg, tc, mesh, None, batch, args.steps)
  tokens = args.batch * args.seq
  n_non_embed = cfg.num_params() - cfg.vocab_size * cfg.d_model * (1 if not cfg.tie_embeddings else 0)
  flops_per_token = 6 * n_non_embed + 12 * cfg.num_layers * cfg.d_model * args.seq
  achieved = flops_per_token * tokens / dt
  print(f"model {cfg.num_params() / 1e6:.1f}M params ({n_non_embed / 1e6:.1f}M non-embedding), "
        f"batch {args.batch} x {args.seq}, {args.dtype}, device {jax.devices()[0].device_kind}")
  print(f"train step: {dt * 1e3:.0f} ms (median of {args.steps}; first incl. compile {compile_s:.1f} s), "
        f"{tokens / dt:.0f} tokens/s, {achieved / 1e9:.1f} GFLOP/s")
  print(f"{args.dtype} matmul peak measured with jax ({n_matmul}^3): {peak / 1e9:.1f} GFLOP/s")
  print(json.dumps(dict(tokens_per_s=round(tokens / dt, 1), mfu=round(achieved / peak, 3),
                        achieved_gflops=round(achieved / 1e9, 1), peak_gflops=round(peak / 1e9, 1),
                        loss=float(m["loss"]))))


if __name__ == "__main__":
  main()
