"""Train-step throughput and model FLOPs utilisation (MFU).

The ~20M-parameter Llama config of benchmarks/sampler.py, batch 16 x 256
tokens, against the float32 matmul peak measured with jax in the same run
(best of several large square matmuls).  MFU counts 6 * N (non-embedding
parameters incl. the output head) + 12 * layers * d_model * seq per token.
With --size smollm2: the real SmolLM2-135M-Instruct on GSM8K chat text, e.g.
  python benchmarks/train_step.py --size smollm2 --seq 512 --batch 8 --grad_accum 2 --remat
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
from restem_jax import model, partitioning, training  # noqa: E402


def matmul_peak(dtype, n: int) -> float:
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda x, y: x @ y)
  jax.block_until_ready(f(a, a))
  t = common.best_of(lambda: jax.block_until_ready(f(a, a)), 5)
  return 2 * n ** 3 / t


def smollm2_batch(args, mesh):
  """SmolLM2-135M-Instruct and GSM8K chat prompts + reference solutions, packed to --seq."""
  import tasks
  from restem_jax import gguf, hf, vocab
  path = gguf.smollm2_path()
  cfg, params = hf.load(path, mesh=mesh, dtype=args.dtype, remat=args.remat)
  v = vocab.HFTokenizerVocabulary(path)
  task = tasks.chat(tasks.get("gsm8k"), v, tasks.ChatFormat())
  ids = [t for r in task.load("train")[:200] for t in v.encode(r["prompt"] + r["solution"]) + [v.eos_id]]
  tokens = np.asarray(ids[:args.batch * (args.seq + 1)], np.int32).reshape(args.batch, args.seq + 1)
  return cfg, params, dict(tokens=tokens, loss_mask=np.ones_like(tokens), reward=np.ones(args.batch, np.float32))


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
  args = ap.parse_args()
  mesh = partitioning.make_mesh()
  params = None
  if args.size == "smollm2":
    cfg, params, batch = smollm2_batch(args, mesh)
  else:
    hf_cfg = common.LLAMA_20M if args.size == "20m" else common.LLAMA_1B
    cfg = common.our_config(hf_cfg, dtype=args.dtype, remat=args.remat)
    rng = np.random.RandomState(0)
    batch = dict(tokens=rng.randint(3, cfg.vocab_size, (args.batch, args.seq + 1)).astype(np.int32),
                 loss_mask=np.ones((args.batch, args.seq + 1), np.int32),
                 reward=np.ones(args.batch, np.float32))
  tc = training.TrainConfig(batch_size=args.batch, grad_accum=args.grad_accum, warmup_steps=1,
                            total_steps=1000)
  n_matmul = 4096 if jax.default_backend() != "cpu" else 2048
  peak = max(matmul_peak(jnp.dtype(args.dtype), n_matmul) for _ in range(2))
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
    for _ in range(args.steps):
      t = time.perf_counter()
      state, m = step(state, batch)
      jax.block_until_ready(m)
      times.append(time.perf_counter() - t)
  dt = float(np.median(times))
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
