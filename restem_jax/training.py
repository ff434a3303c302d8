"""Reward-weighted fine-tuning: loss, optimizer, jitted sharded steps, train loop.

A batch is a dict of numpy arrays:
  tokens    [B, L] int32  prompt + solution (+ EOS), right-padded with 0
  loss_mask [B, L]        1 where the token is a solution token to predict
  reward    [B]   float32 the example's reward r (1.0 for SFT data)

Loss (reward-weighted NLL, per-token mean over weighted tokens):

    loss = sum_{i,t} r_i m_it nll_it / sum_{i,t} r_i m_it

over the whole optimizer batch (all accumulation micro-batches together).
Examples with r = 0 add nothing to numerator or denominator: no gradient.
With binary rewards this is the ordinary token-mean NLL on the kept samples.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from restem_jax import checkpoints
from restem_jax import model as model_lib
from restem_jax import partitioning


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  learning_rate: float = 1e-3
  warmup_steps: int = 50
  total_steps: int = 500
  schedule: str = "cosine"  # "cosine" | "constant"
  end_lr_fraction: float = 0.1
  weight_decay: float = 0.01
  b1: float = 0.9
  b2: float = 0.95
  grad_clip: float = 1.0
  grad_accum: int = 1  # micro-batches per optimizer step
  batch_size: int = 32  # examples per optimizer step (all micro-batches)
  eval_every: int = 100
  checkpoint_every: int = 100
  keep_checkpoints: int = 2
  log_every: int = 20
  seed: int = 0


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


def learning_rate_fn(tc: TrainConfig) -> optax.Schedule:
  if tc.schedule == "constant":
    decay = optax.constant_schedule(tc.learning_rate)
  elif tc.schedule == "cosine":
    decay = optax.cosine_decay_schedule(
        tc.learning_rate, max(1, tc.total_steps - tc.warmup_steps), alpha=tc.end_lr_fraction)
  else:
    raise ValueError(f"TrainConfig.schedule: unknown schedule {tc.schedule!r}")
  warm = optax.linear_schedule(0.0, tc.learning_rate, max(1, tc.warmup_steps))
  return optax.join_schedules([warm, decay], [tc.warmup_steps])


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
  return optax.chain(
      optax.clip_by_global_norm(tc.grad_clip),
      optax.adamw(learning_rate_fn(tc), b1=tc.b1, b2=tc.b2, weight_decay=tc.weight_decay))


def loss_sums(cfg: model_lib.ModelConfig, params, batch):
  """(sum of weighted NLL, sum of weights, weighted correct tokens)."""
  tokens = batch["tokens"]
  logits_BxLxV, _ = model_lib.apply(cfg, params, tokens[:, :-1])
  targets_BxL = tokens[:, 1:]
  w_BxL = batch["loss_mask"][:, 1:].astype(jnp.float32) * batch["reward"][:, None]
  logp_BxLxV = jax.nn.log_softmax(logits_BxLxV)
  nll_BxL = -jnp.take_along_axis(logp_BxLxV, targets_BxL[..., None], -1)[..., 0]
  correct = (jnp.argmax(logits_BxLxV, -1) == targets_BxL) & (w_BxL > 0)
  return jnp.sum(nll_BxL * w_BxL), jnp.sum(w_BxL), jnp.sum(correct * w_BxL)


def train_step(state: TrainState, batch, *, cfg, tc: TrainConfig, rules):
  """One optimizer step; micro-batches are accumulated with a scan."""
  with nn.logical_axis_rules(rules):
    k = tc.grad_accum
    micro = jax.tree.map(lambda x: x.reshape((k, x.shape[0] // k) + x.shape[1:]), batch)

    def micro_loss(params, mb):
      loss_sum, w_sum, correct = loss_sums(cfg, params, mb)
      return loss_sum, jnp.stack([loss_sum, w_sum, correct])

    def micro_step(carry, mb):
      g_acc, sums = carry
      g, s = jax.grad(micro_loss, has_aux=True)(state.params, mb)
      return (jax.tree.map(jnp.add, g_acc, g), sums + s), None

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    (g_sum, sums), _ = jax.lax.scan(micro_step, (zeros, jnp.zeros(3)), micro)
    denom = jnp.maximum(sums[1], 1e-8)
    grads = jax.tree.map(lambda g: g / denom, g_sum)
    updates, opt_state = make_optimizer(tc).update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(loss=sums[0] / denom, accuracy=sums[2] / denom, tokens=sums[1],
                   grad_norm=optax.tree.norm(grads),
                   learning_rate=learning_rate_fn(tc)(state.step))
    return TrainState(state.step + 1, params, opt_state), metrics


def eval_step(params, batch, *, cfg, rules):
  with nn.logical_axis_rules(rules):
    return jnp.stack(loss_sums(cfg, params, batch))


def _abstract_state(cfg, tc):
  def init(rng):
    params = model_lib.init_params(cfg, rng)
    return TrainState(jnp.int32(0), params, make_optimizer(tc).init(params))
  return jax.eval_shape(init, jax.random.key(0)), init


def state_shardings(cfg, tc, mesh, rules=partitioning.DEFAULT_RULES):
  """Shardings of the whole TrainState, from eval_shape + logical rules."""
  boxed, _ = _abstract_state(cfg, tc)
  return partitioning.logical_shardings(boxed, mesh, rules)


def create_state(cfg, tc, mesh, rng=None, params=None, rules=partitioning.DEFAULT_RULES):
  """Fresh TrainState created directly sharded (random init or given params)."""
  shardings = state_shardings(cfg, tc, mesh, rules)
  _, init = _abstract_state(cfg, tc)
  if params is None:
    rng = jax.random.key(tc.seed) if rng is None else rng
    make = jax.jit(lambda r: nn.unbox(init(r)), out_shardings=shardings)
    return make(rng), shardings
  # a fresh copy: the train step donates its state, and the caller may reuse `params`
  params = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=shardings.params)(params)
  opt_state = jax.jit(make_optimizer(tc).init, out_shardings=shardings.opt_state)(params)
  return TrainState(jax.device_put(jnp.int32(0), shardings.step), params, opt_state), shardings


def batch_sharding(mesh, rules=partitioning.DEFAULT_RULES):
  return NamedSharding(mesh, P(nn.logical_to_mesh_axes(("batch",), rules)[0]))


def jit_train_step(cfg, tc, mesh, shardings, rules=partitioning.DEFAULT_RULES):
  replicated = NamedSharding(mesh, P())
  return jax.jit(functools.partial(train_step, cfg=cfg, tc=tc, rules=rules),
                 in_shardings=(shardings, batch_sharding(mesh, rules)),
                 out_shardings=(shardings, replicated), donate_argnums=0)


def jit_eval_step(cfg, mesh, param_shardings, rules=partitioning.DEFAULT_RULES):
  return jax.jit(functools.partial(eval_step, cfg=cfg, rules=rules),
                 in_shardings=(param_shardings, batch_sharding(mesh, rules)),
                 out_shardings=NamedSharding(mesh, P()))


# ----------------------------------------------------------------------------- data


def batch_for_step(data: dict, step: int, batch_size: int, seed: int) -> dict:
  """Deterministic batch of step `step`: epoch-wise shuffles of the examples.

  Only depends on (data, step, seed), so a resumed run sees the same batches.
  """
  n = len(data["reward"])
  per_epoch = max(1, n // batch_size)
  epoch, i = divmod(step, per_epoch)
  order = np.random.default_rng([seed, epoch]).permutation(n)
  idx = order[i * batch_size:(i + 1) * batch_size]
  if len(idx) < batch_size:  # fewer examples than one batch: wrap around
    idx = np.resize(order, batch_size)
  return {k: v[idx] for k, v in data.items()}


def train(cfg, tc: TrainConfig, data: dict, workdir: str, mesh, *, init_params=None,
          validate: Callable[[Any], float] | None = None, rules=partitioning.DEFAULT_RULES,
          log: Callable[[dict], None] | None = None, progress: Callable | None = None):
  """Trains for `tc.total_steps`, resuming from `workdir/checkpoints` if present.

  `validate(params) -> float` (higher is better) runs every `eval_every` steps
  and at the end; the best parameters are kept in `workdir/best`.  Returns
  (best_params, best_score, final_state); without `validate`, the final
  parameters and None.  With several processes every host computes the same
  global batch and feeds its own slice of it.
  """
  if tc.batch_size % tc.grad_accum:
    raise ValueError(f"TrainConfig: batch_size {tc.batch_size} is not divisible by "
                     f"grad_accum {tc.grad_accum}")
  dp = partitioning.data_parallel_size(mesh)
  if (tc.batch_size // tc.grad_accum) % dp:
    raise ValueError(f"TrainConfig: micro-batch {tc.batch_size // tc.grad_accum} is not "
                     f"divisible by the mesh's data-parallel size {dp}")
  ckpt = checkpoints.manager(os.path.join(workdir, "checkpoints"), tc.keep_checkpoints)
  best = checkpoints.manager(os.path.join(workdir, "best"), 1)
  state, shardings = create_state(cfg, tc, mesh, params=init_params, rules=rules)
  meta = {"best_score": None, "best_step": None}
  if ckpt.latest_step() is not None:
    state, meta = checkpoints.restore(ckpt, ckpt.latest_step(), state)
    logging.info("resumed from step %d", int(state.step))
  if best.latest_step() is not None:  # the best may be newer than the last checkpoint
    meta = checkpoints.read_metadata(best, best.latest_step())
  step_fn = jit_train_step(cfg, tc, mesh, shardings, rules)

  def evaluate_and_keep(state):
    if validate is None:
      return
    score = float(validate(state.params))
    if log:
      log({"step": int(state.step), "validation": score})
    if meta["best_score"] is None or score > meta["best_score"]:
      meta.update(best_score=score, best_step=int(state.step))
      checkpoints.save(best, int(state.step), state.params, meta, force=True)

  start = int(state.step)
  t0 = time.time()
  for step in range(start, tc.total_steps):
    batch = batch_for_step(data, step, tc.batch_size, tc.seed)
    if jax.process_count() > 1:
      per_host = tc.batch_size // jax.process_count()
      lo = jax.process_index() * per_host
      batch = partitioning.host_local_batch_to_global(
          {k: v[lo:lo + per_host] for k, v in batch.items()}, mesh, rules)
    state, metrics = step_fn(state, batch)
    done = step + 1
    if log and (done % tc.log_every == 0 or done == tc.total_steps):
      m = {k: float(v) for k, v in jax.device_get(metrics).items()}
      log({"step": done, **m, "steps_per_s": (done - start) / (time.time() - t0)})
    if progress:
      progress(done)
    if done % tc.eval_every == 0 and done != tc.total_steps:
      evaluate_and_keep(state)
    if done % tc.checkpoint_every == 0 or done == tc.total_steps:
      checkpoints.save(ckpt, done, state, meta)
  if int(state.step) == tc.total_steps and (meta["best_step"] != tc.total_steps):
    evaluate_and_keep(state)
  ckpt.wait_until_finished()
  best.wait_until_finished()
  if validate is None or best.latest_step() is None:
    return state.params, None, state
  best_params, _ = checkpoints.restore(best, best.latest_step(), state.params)
  return best_params, meta["best_score"], state
