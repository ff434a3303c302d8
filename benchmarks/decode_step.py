"""Where a decode step of the real model goes: SmolLM2-135M, R rows continuing C
prompts (a shared prefix of P slots), each row's own cache W slots wide, T=0.7,
top-k 40 (`sampling.decode_loop`, the E-step's loop).

Prints the wall time of a step (the best of 2 timed runs of the last `--steps`
steps of the segment) and the XLA CPU threads' time of one step by operation
(from `jax.profiler`'s trace, read with TensorFlow's XPlane proto): each executed
fusion is named by its HLO metadata (the jax op and module path, layers merged)
and its output shape.  Thread time above the wall time is work on both cores;
a part that runs on one core shows its full wall time.
Usage: python benchmarks/decode_step.py [--rows 256] [--prompts 32] [--width 256] [--prefix 192]
"""
import argparse
import collections
import glob
import json
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from restem_jax import gguf, hf, model, sampling  # noqa: E402


def thread_ms_by_op(trace_dir: str, hlo: str) -> collections.Counter:
  """XLA CPU worker threads' milliseconds per operation (the fusion's jax op name,
  layer numbers merged, and its output shape) in the trace's XPlane."""
  from tensorflow.tsl.profiler.protobuf import xplane_pb2  # noqa: PLC0415
  label = {}
  for line in hlo.splitlines():
    m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (\S+) ", line)
    if m:
      op = re.search(r'op_name="([^"]*)"', line)
      op = re.sub(r"layer_\d+", "layer_*", op.group(1).split("while/body/")[-1]) if op else "?"
      label[m.group(1)] = f"{op}  {m.group(2).split('{')[0]}"
  space = xplane_pb2.XSpace()
  with open(sorted(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True))[-1], "rb") as f:
    space.ParseFromString(f.read())
  out = collections.Counter()
  for plane in space.planes:
    names = {k: v.name for k, v in plane.event_metadata.items()}
    for line in plane.lines:
      if not line.name.startswith("tf_XLAEigen"):
        continue
      for ev in line.events:
        name = names.get(ev.metadata_id, "?")
        if not name.startswith(("ThunkExecutor", "Slinky", "Threadpool")):
          out[label.get(name, name)] += ev.duration_ps / 1e9
  return out


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--rows", type=int, default=256)
  ap.add_argument("--prompts", type=int, default=32)
  ap.add_argument("--width", type=int, default=256)
  ap.add_argument("--prefix", type=int, default=192)
  ap.add_argument("--steps", type=int, default=16)
  ap.add_argument("--profile_steps", type=int, default=8)
  args = ap.parse_args()
  r, c, w, pl = args.rows, args.prompts, args.width, args.prefix
  cfg, params = hf.load(gguf.smollm2_path())
  sc = sampling.SamplingConfig(num_samples=1, temperature=0.7, top_k=40, max_new_tokens=w)
  prefix = [{k: jax.random.normal(jax.random.key(i), x.shape, x.dtype) * 0.5 for k, x in layer.items()}
            for i, layer in enumerate(model.init_cache(cfg, c, pl))]
  mask = jnp.ones((r, pl), jnp.int32)
  kw = dict(cfg=cfg, sc=sc, width=w, num_rows=r)
  consts = (jnp.int32(-1), jnp.int32(-1), jnp.int32(0))  # never stop early, no EOS, pad 0

  def state(start):  # every own slot real, `start` steps done
    s = sampling.decode_init(jnp.zeros((r, cfg.vocab_size)), mask, jax.random.key(1), *consts[1:],
                             jnp.int32(r), **{k: kw[k] for k in ("cfg", "sc")})
    s = sampling.decode_grow(s, pl + w)
    s["kv_mask"] = s["kv_mask"].at[:, pl:].set(True)
    return jax.block_until_ready(dict(s, step=jnp.int32(start)))

  # one compiled loop, timed and traced (the trace's fusion names are its HLO's)
  compiled = sampling.decode_loop.lower(params, state(0), prefix, *consts, **kw).compile()

  def run(s):
    jax.block_until_ready(compiled(params, s, prefix, *consts)["tokens"])

  run(state(w - 2))
  best = float("inf")
  for _ in range(2):
    s = state(w - args.steps)
    t0 = time.perf_counter()
    run(s)
    best = min(best, time.perf_counter() - t0)
  step_ms = best / args.steps * 1e3
  print(f"decode step, {r} rows ({c} prompts x {r // c}), prefix {pl} + own {w} slots: {step_ms:.0f} ms "
        f"({r / step_ms * 1e3:.0f} slots/s)", flush=True)
  res = dict(rows=r, prompts=c, width=w, prefix=pl, step_ms=round(step_ms, 1))
  try:
    hlo = compiled.as_text()
    with tempfile.TemporaryDirectory() as trace:
      s = state(w - args.profile_steps)
      jax.profiler.start_trace(trace)
      run(s)
      jax.profiler.stop_trace()
      by_op = thread_ms_by_op(trace, hlo)
    total = sum(by_op.values()) / args.profile_steps
    print(f"XLA threads' time a step: {total:.0f} ms (wall {step_ms:.0f} ms); the largest parts:")
    for k, ms in by_op.most_common(15):
      print(f"  {ms / args.profile_steps:6.1f} ms  {k}")
    res["thread_ms_per_step"] = round(total, 1)
  except ImportError as e:
    print(f"no breakdown: {e}")
  print(json.dumps(res))


if __name__ == "__main__":
  main()
