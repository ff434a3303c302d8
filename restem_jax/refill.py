"""Continuous batching for the sampler (`SamplingConfig(refill=True)`).

A pool of R rows, each holding one (prompt, sample) at a time in its own
ring-buffer cache of W = P + T slots.  Every step writes slot g mod W for all
rows (g: the pool's step count); a row that starts at step g0 has its prompt
rolled into slots g0 - P .. g0 - 1 and its tokens follow, so it never
overwrites its own slots.  When enough rows have finished, the host collects
them and refills them with the next waiting items (their prompts prefilled
once per refill); the pool never waits for its longest row.  Once nothing
waits, the pool halves as its live rows fit.

The price: every row attends over its own W slots at every step (no prompt
shared by the samples of a prompt, no cache that grows with the step).  On a
2-core CPU that attention is memory-bound (256 rows x 448 slots: ~0.3 s of a
~1.0 s step, against ~0.7 s for the shared-prefix loop of `sampling.decode_loop`),
so the fixed batches stay the default there; on an accelerator's memory
bandwidth the balance differs.
"""
from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from restem_jax import model as model_lib
from restem_jax import multihost, partitioning
from restem_jax.sampling import (Samples, SamplingConfig, bucket_length, left_pad, next_token, prefill,
                                 take_rows)


@functools.partial(jax.jit, static_argnames=("cfg", "rows", "width", "t", "rules"))
def ring_init(rng, pad_id, *, cfg: model_lib.ModelConfig, rows: int, width: int, t: int,
              rules=partitioning.DEFAULT_RULES):
  """An empty pool: every row done (free)."""
  with nn.logical_axis_rules(rules):
    cache = [{name: model_lib.constrain(c, model_lib.CACHE_NAMES[name]) for name, c in layer.items()}
             for layer in model_lib.init_cache(cfg, rows, width)]
    return dict(step=jnp.int32(0), tokens=jnp.full((rows, t), pad_id, jnp.int32),
                logprobs=jnp.zeros((rows, t), jnp.float32), count=jnp.zeros((rows,), jnp.int32),
                done=jnp.ones((rows,), bool), last=jnp.full((rows,), pad_id, jnp.int32),
                position=jnp.zeros((rows,), jnp.int32), kv_mask=jnp.zeros((rows, width), bool),
                cache=cache, rng=rng)


@functools.partial(jax.jit, static_argnames=("sc", "rules"), donate_argnums=(0,))
def ring_insert(state, logits_RxV, prompt_cache, prompt_mask_RxP, src_M, rows_M, rng, eos_id, pad_id, *,
                sc: SamplingConfig, rules=partitioning.DEFAULT_RULES):
  """Starts prefilled prompt src_M[i] (`prefill`'s outputs) in pool row rows_M[i]
  (rows_M entries past the pool are ignored): its cache rolled into the ring so that
  it ends just before the pool's next slot, and its first token drawn."""
  with nn.logical_axis_rules(rules):
    p = prompt_mask_RxP.shape[1]
    w = state["kv_mask"].shape[1]
    shift = (state["step"] - p) % w

    def place(x, axis):  # [R', .., P, ..] -> [M, .., W, ..], slot i -> (step - P + i) mod W
      x = jnp.pad(x, [(0, w - p if a == axis else 0) for a in range(x.ndim)])
      return jnp.roll(x, shift, axis=axis)[src_M]

    put = lambda a, v: a.at[rows_M].set(v, mode="drop")  # noqa: E731
    cache = [{name: put(state["cache"][i][name], place(c, model_lib.CACHE_LENGTH_AXIS[name]))
              for name, c in layer.items()} for i, layer in enumerate(prompt_cache)]
    tok_M, lp_M = next_token(logits_RxV[src_M], rng, jnp.zeros(src_M.shape, bool), sc=sc, pad_id=pad_id)
    t = state["tokens"].shape[1]
    return dict(
        state, cache=cache,
        kv_mask=put(state["kv_mask"], place(prompt_mask_RxP.astype(bool), 1)),
        tokens=put(state["tokens"], jnp.full((len(src_M), t), pad_id, jnp.int32).at[:, 0].set(tok_M)),
        logprobs=put(state["logprobs"], jnp.zeros((len(src_M), t), jnp.float32).at[:, 0].set(lp_M)),
        count=put(state["count"], jnp.ones(src_M.shape, jnp.int32)),
        done=put(state["done"], (tok_M == eos_id) | (t == 1)),
        last=put(state["last"], tok_M),
        position=put(state["position"], jnp.sum(prompt_mask_RxP, 1).astype(jnp.int32)[src_M]))


@functools.partial(jax.jit, static_argnames=("cfg", "sc", "rules"), donate_argnums=(1,))
def ring_decode(params, state, stop_at_done, eos_id, pad_id, *, cfg: model_lib.ModelConfig,
                sc: SamplingConfig, rules=partitioning.DEFAULT_RULES):
  """Decodes the pool until `stop_at_done` rows are done (or all are)."""
  with nn.logical_axis_rules(rules):
    r, t = state["tokens"].shape
    w = state["kv_mask"].shape[1]
    rows_R = jnp.arange(r)

    def body(s):
      rng, sub = jax.random.split(s["rng"])
      done = s["done"]
      slot = s["step"] % w
      kv_mask = s["kv_mask"].at[:, slot].set(~done)
      logits, cache = model_lib.apply(
          cfg, params, s["last"][:, None], positions_BxL=s["position"][:, None], kv_mask_BxS=kv_mask,
          cache=s["cache"], cache_index=slot, ring=True)
      tok_R, lp_R = next_token(logits[:, 0], sub, done, sc=sc, pad_id=pad_id)
      at_R = jnp.where(done, r, rows_R)  # finished rows write nothing
      count = s["count"] + (~done).astype(jnp.int32)
      return dict(
          step=s["step"] + 1,
          tokens=s["tokens"].at[at_R, s["count"]].set(tok_R, mode="drop"),
          logprobs=s["logprobs"].at[at_R, s["count"]].set(lp_R, mode="drop"),
          count=count,
          done=done | (tok_R == eos_id) | (count >= t),
          last=tok_R,
          position=s["position"] + (~done).astype(jnp.int32),
          kv_mask=kv_mask,
          cache=[{name: model_lib.constrain(c, model_lib.CACHE_NAMES[name]) for name, c in layer.items()}
                 for layer in cache],
          rng=rng)

    return jax.lax.while_loop(
        lambda s: ~jnp.all(s["done"]) & (jnp.sum(s["done"]) < stop_at_done), body, state)


ring_compact = jax.jit(take_rows)  # the pool's rows `keep_M` only (a smaller pool)


def sample_refill(cfg: model_lib.ModelConfig, params, prompt_tokens: Sequence[Sequence[int]],
                  sc: SamplingConfig, *, eos_id: int, pad_id: int, rng: jax.Array, rows: int,
                  max_prompt_len: int | None, mesh, rules, progress, refill_fraction: float = 0.125
                  ) -> Samples:
  """`sample` with continuous batching over a pool of `rows` rows: the pool decodes
  until `refill_fraction` of its rows are free, which then take the next waiting
  (prompt, sample) pairs, prompt-major in order of prompt length.  Once nothing
  waits, the pool halves (down to an eighth) as its live rows fit."""
  n, t = sc.num_samples, sc.max_new_tokens
  num = len(prompt_tokens)
  order = np.argsort([len(p) for p in prompt_tokens], kind="stable")
  items = [(int(i), j) for i in order for j in range(n)]
  plen = max_prompt_len or bucket_length(max(map(len, prompt_tokens), default=1))
  dp = 1 if mesh is None else partitioning.data_parallel_size(mesh)
  rows = max(dp, -(-min(rows, -(-len(items) // dp) * dp) // dp) * dp)  # no more rows than items
  chunk = max(1, int(rows * refill_fraction))
  # `chunk` consecutive prompt-major items hold at most this many prompts: one prefill shape
  rp = -(-min(num, -(-chunk // n) + 1) // dp) * dp
  out_t = np.full((num, n, t), pad_id, np.int32)
  out_l = np.zeros((num, n), np.int32)
  out_lp = np.zeros((num, n, t), np.float32)
  put = (lambda a, names: jnp.asarray(a)) if mesh is None else (lambda a, names: multihost.global_array(
      a, partitioning.sharding_for(mesh, names, a.shape, rules)))
  state = ring_init(jax.random.fold_in(rng, 0), jnp.int32(pad_id), cfg=cfg, rows=rows, width=plen + t, t=t,
                    rules=rules)
  owner = [None] * rows  # the (prompt, sample) each row holds
  min_rows = max(dp, rows // 8)
  nxt, finished, event, computed = 0, 0, 0, 0
  done = np.ones(rows, bool)
  while True:
    free = [r for r in range(rows) if done[r]]
    held = [r for r in free if owner[r] is not None]
    if held:  # collect finished rows
      toks, count, lps = (multihost.to_host(state[k]) for k in ("tokens", "count", "logprobs"))
      for r in held:
        i, j = owner[r]
        out_t[i, j], out_l[i, j], out_lp[i, j] = toks[r], count[r], lps[r]
        owner[r] = None
      finished += len(held)
      if progress:
        progress(finished // n)
    while free and nxt < len(items):  # refill free rows, `chunk` at a time
      take = items[nxt:nxt + min(len(free), chunk)]
      targets, free = free[:len(take)], free[len(take):]
      nxt += len(take)
      uniq = sorted({i for i, _ in take}, key=lambda i: len(prompt_tokens[i]))
      glen = max_prompt_len or bucket_length(max(len(prompt_tokens[i]) for i in uniq))
      toks, mask = left_pad([prompt_tokens[i] for i in uniq], glen, rp, pad_id)
      logits, cache = prefill(params, put(toks, ("batch", "length")), put(mask, ("batch", "length")),
                              cfg=cfg, length=plen, rules=rules)
      mask = np.pad(mask, ((0, 0), (plen - glen, 0)))
      src = np.zeros(chunk, np.int32)
      dst = np.full(chunk, rows, np.int32)  # past the pool: ignored
      src[:len(take)] = [uniq.index(i) for i, _ in take]
      dst[:len(take)] = targets
      event += 1
      state = ring_insert(state, logits, cache, put(mask, ("batch", "length")), put(src, (None,)),
                          put(dst, (None,)), jax.random.fold_in(rng, event), jnp.int32(eos_id),
                          jnp.int32(pad_id), sc=sc, rules=rules)
      for r, item in zip(targets, take):
        owner[r] = item
    if all(o is None for o in owner):
      break
    live = [r for r in range(rows) if owner[r] is not None]
    if nxt == len(items):
      # Draining (nothing waits): halve the pool while its live rows fit in half of it,
      # down to `min_rows`, so that the last long rows do not drag the whole pool along.
      size = rows
      while size // 2 >= min_rows and size // 2 % dp == 0 and len(live) <= size // 2:
        size //= 2
      if size < rows:
        keep = live + [r for r in range(rows) if owner[r] is None][:size - len(live)]
        state = ring_compact(state, put(np.asarray(keep, np.int32), (None,)))
        owner = [owner[r] for r in keep]
        rows = size
    half = rows // 2
    if nxt < len(items):
      stop = chunk
    elif half >= min_rows and half % dp == 0:
      stop = rows - half  # until the live rows fit in half the pool
    else:
      stop = rows
    before = int(state["step"])
    state = ring_decode(params, state, jnp.int32(stop), jnp.int32(eos_id), jnp.int32(pad_id),
                        cfg=cfg, sc=sc, rules=rules)
    done = multihost.to_host(state["done"])
    computed += rows * (int(state["step"]) - before)
  return Samples(out_t, out_l, out_lp, computed + len(items))
