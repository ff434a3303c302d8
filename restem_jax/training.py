"""Reward-weighted fine-tuning: loss, optimizer, jitted sharded steps, train loop.

A batch is a dict of numpy arrays:
  tokens    [B, L] int32  prompt + solution (+ EOS), right-padded with 0
  loss_mask [B, L]        1 where the token is a solution token to predict
  weight    [B]   float32 the example's weight: its reward r (1.0 for SFT data)

Loss (reward-weighted NLL, per-token mean over weighted tokens):

    loss = sum_{i,t} r_i m_it nll_it / sum_{i,t} r_i m_it      (`nll_loss`, the default)

over the whole optimizer batch (all accumulation micro-batches together).
Examples with r = 0 add nothing to numerator or denominator: no gradient.
With binary rewards this is the ordinary token-mean NLL on the kept samples.

Packing (`TrainConfig.pack`, on by default; `pack_rows`): before training the
examples are packed several to a row of the same width (best-fit decreasing),
as t5x/seqio and MaxText do.  A packed set adds
  segment_ids [B, L] int32  1, 2, .. per example in the row; 0 on padding
  positions   [B, L] int32  each example's own positions, from 0
and its `weight` is per token, [B, L].  Attention stays within a segment and
every mask keeps its own segment's positions, so each example's loss and
gradient are what they are unpacked; `batch_size` then counts rows.  Only a
loss that reads packed batches (`segments`, `token_weights`) and says so
(`loss_fn.packable = True`, as `nll_loss` and `reward.loss` do) gets them; any
other loss gets one example per row.
`train` takes any loss of the same form, `loss_fn(params, batch) -> (sum,
weight, {name: sum})`, and any `init_fn`, so reward models reuse the same
sharded step, accumulation, checkpoints, resume and keep-best.
"""
from __future__ import annotations

import bisect
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

from restem_jax import checkpoints, multihost
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
  pack: bool = True  # several examples per row (`pack_rows`); batch_size counts rows


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


LossFn = Callable[[Any, dict], tuple]  # (params, batch) -> (loss sum, weight sum, {name: sum})


def nll_loss(cfg: model_lib.ModelConfig) -> LossFn:
  """The reward-weighted NLL of the policy (the default loss of `train`).

  Returns sums over the batch: the weighted NLL, the weight, and the weighted
  count of tokens the model predicts right (reported as `accuracy`)."""
  def loss_fn(params, batch):
    tokens = batch["tokens"]
    logits_BxLxV, _ = model_lib.apply(cfg, params, tokens[:, :-1], **segments(batch, inputs=True))
    targets_BxL = tokens[:, 1:]
    w_BxL = batch["loss_mask"][:, 1:].astype(jnp.float32) * token_weights(batch)[:, 1:]
    if "segment_ids" in batch:  # no target from the next example in the row
      w_BxL *= batch["segment_ids"][:, 1:] == batch["segment_ids"][:, :-1]
    logp_BxLxV = jax.nn.log_softmax(logits_BxLxV)
    nll_BxL = -jnp.take_along_axis(logp_BxLxV, targets_BxL[..., None], -1)[..., 0]
    correct_BxL = (jnp.argmax(logits_BxLxV, -1) == targets_BxL) & (w_BxL > 0)
    return jnp.sum(nll_BxL * w_BxL), jnp.sum(w_BxL), {"accuracy": jnp.sum(correct_BxL * w_BxL)}
  loss_fn.packable = True
  return loss_fn


def segments(batch, inputs: bool = False) -> dict:
  """The decoder's packing arguments of a batch ({} unpacked); `inputs`: of
  tokens[:, :-1] (a next-token loss's inputs)."""
  if "segment_ids" not in batch:
    return {}
  cut = (lambda x: x[:, :-1]) if inputs else (lambda x: x)
  return dict(segment_ids_BxL=cut(batch["segment_ids"]), positions_BxL=cut(batch["positions"]))


def token_weights(batch):
  """Example weights per token [B, L] (packed sets carry them so; unpacked: per row)."""
  r = batch["weight"].astype(jnp.float32)
  return r if r.ndim == 2 else jnp.broadcast_to(r[:, None], batch["tokens"].shape)


def train_step(state: TrainState, batch, *, loss_fn: LossFn, tc: TrainConfig, rules):
  """One optimizer step; micro-batches are accumulated with a scan, and the
  loss is normalised by the weight of the whole optimizer batch."""
  with nn.logical_axis_rules(rules):
    k = tc.grad_accum
    micro = jax.tree.map(lambda x: x.reshape((k, x.shape[0] // k) + x.shape[1:]), batch)

    def micro_loss(params, mb):
      total, weight, sums = loss_fn(params, mb)
      return total, (total, weight, sums)

    def micro_step(carry, mb):
      g_acc, aux_acc = carry
      g, aux = jax.grad(micro_loss, has_aux=True)(state.params, mb)
      return (jax.tree.map(jnp.add, g_acc, g), jax.tree.map(jnp.add, aux_acc, aux)), None

    first = jax.tree.map(lambda x: x[0], micro)
    aux0 = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32),
                        jax.eval_shape(lambda p: micro_loss(p, first)[1], state.params))
    zeros = jax.tree.map(jnp.zeros_like, state.params)
    (g_sum, (total, weight, sums)), _ = jax.lax.scan(micro_step, (zeros, aux0), micro)
    denom = jnp.maximum(weight, 1e-8)
    grads = jax.tree.map(lambda g: g / denom, g_sum)
    updates, opt_state = make_optimizer(tc).update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(loss=total / denom, tokens=weight, grad_norm=optax.tree.norm(grads),
                   learning_rate=learning_rate_fn(tc)(state.step),
                   **{name: v / denom for name, v in sums.items()})
    return TrainState(state.step + 1, params, opt_state), metrics


def eval_step(params, batch, *, loss_fn: LossFn, rules):
  """[loss sum, weight sum] of a batch."""
  with nn.logical_axis_rules(rules):
    total, weight, _ = loss_fn(params, batch)
    return jnp.stack([total, weight])


def _state_init(init_fn, tc):
  """rng -> a fresh TrainState (boxed parameters, their optimizer state)."""
  def init(rng):
    params = init_fn(rng)
    return TrainState(jnp.int32(0), params, make_optimizer(tc).init(params))
  return init


def state_shardings(init_fn, tc, mesh, rules=partitioning.DEFAULT_RULES):
  """Shardings of the whole TrainState (`partitioning.abstract_target`: eval_shape +
  logical rules).  `init_fn(rng)` returns boxed (logically named) parameters."""
  return jax.tree.map(lambda s: s.sharding, partitioning.abstract_target(_state_init(init_fn, tc), mesh, rules))


def create_state(init_fn, tc, mesh, rng=None, params=None, rules=partitioning.DEFAULT_RULES):
  """Fresh TrainState created directly sharded (random init or given params)."""
  shardings = state_shardings(init_fn, tc, mesh, rules)
  init = _state_init(init_fn, tc)
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


def jit_train_step(loss_fn, tc, mesh, shardings, rules=partitioning.DEFAULT_RULES):
  replicated = NamedSharding(mesh, P())
  return jax.jit(functools.partial(train_step, loss_fn=loss_fn, tc=tc, rules=rules),
                 in_shardings=(shardings, batch_sharding(mesh, rules)),
                 out_shardings=(shardings, replicated), donate_argnums=0)


def jit_eval_step(loss_fn, mesh, param_shardings, rules=partitioning.DEFAULT_RULES):
  return jax.jit(functools.partial(eval_step, loss_fn=loss_fn, rules=rules),
                 in_shardings=(param_shardings, batch_sharding(mesh, rules)),
                 out_shardings=NamedSharding(mesh, P()))


# ----------------------------------------------------------------------------- data


def batch_for_step(data: dict, step: int, batch_size: int, seed: int) -> dict:
  """Deterministic batch of step `step`: epoch-wise shuffles of the examples.

  Only depends on (data, step, seed), so a resumed run sees the same batches.
  """
  n = len(data["weight"])
  per_epoch = max(1, n // batch_size)
  epoch, i = divmod(step, per_epoch)
  order = np.random.default_rng([seed, epoch]).permutation(n)
  idx = order[i * batch_size:(i + 1) * batch_size]
  if len(idx) < batch_size:  # fewer examples than one batch: wrap around
    idx = np.resize(order, batch_size)
  return {k: v[idx] for k, v in data.items()}


def example_lengths(data: dict) -> np.ndarray:
  """Tokens each example needs: through its last position with weight in any
  mask (`*mask` keys); later tokens cannot reach the loss (causal attention)."""
  masks = [np.asarray(v) != 0 for k, v in data.items() if k.endswith("mask") and np.ndim(v) == 2]
  if not masks:
    raise ValueError(f"a training set needs a `*mask` key to pack (keys: {sorted(data)})")
  any_BxL = np.logical_or.reduce(masks)
  last = any_BxL.shape[1] - np.argmax(any_BxL[:, ::-1], axis=1)
  return np.where(any_BxL.any(1), last, 0)


def pack_rows(data: dict) -> dict:
  """A training set of one example per row -> rows of the same width holding
  several examples each (best-fit decreasing: 90% real tokens on GSM8K chat
  examples at 448 in benchmarks/train_step.py, against 56% one per row).

  Per-token keys ([N, L]) are moved with their examples; per-example keys ([N],
  the weight) become per token.  Adds `segment_ids` and `positions` (see the
  module docstring).  Examples without any weighted position are dropped (they
  add nothing to a loss).  Deterministic: every host packs the same rows.
  """
  if "segment_ids" in data:
    return data
  n, width = data["tokens"].shape
  lengths = example_lengths(data)
  rows, room = [], []  # rows' example lists; (room left, row) sorted
  for i in sorted(range(n), key=lambda i: (-lengths[i], i)):
    if lengths[i] == 0:
      continue
    j = bisect.bisect_left(room, (int(lengths[i]), -1))
    if j < len(room):
      left, r = room.pop(j)
    else:
      left, r = width, len(rows)
      rows.append([])
    rows[r].append(i)
    bisect.insort(room, (left - int(lengths[i]), r))
  out = {k: np.zeros((len(rows), width), np.asarray(v).dtype) for k, v in data.items()}
  out["weight"] = np.zeros((len(rows), width), np.float32)
  out["segment_ids"] = np.zeros((len(rows), width), np.int32)
  out["positions"] = np.zeros((len(rows), width), np.int32)
  for r, members in enumerate(rows):
    at = 0
    for s, i in enumerate(members, 1):
      m = int(lengths[i])
      for k, v in data.items():
        if np.ndim(v) == 2:
          out[k][r, at:at + m] = v[i, :m]
        else:
          out[k][r, at:at + m] = v[i]
      out["segment_ids"][r, at:at + m] = s
      out["positions"][r, at:at + m] = np.arange(m)
      at += m
  return out


def prepare(data: dict, tc: TrainConfig, loss_fn: LossFn | None = None) -> dict:
  """The set `train` trains on: packed (`pack_rows`) when `tc.pack` and the loss
  reads packed batches (`loss_fn.packable`; None: the default NLL, which does)."""
  if loss_fn is not None and not getattr(loss_fn, "packable", False):
    if "segment_ids" in data:
      raise ValueError("packed training data for a loss that does not read packed batches "
                       "(set loss_fn.packable = True once it does, or pass examples one per row)")
    return data
  if not tc.pack or "segment_ids" in data or not len(data["tokens"]):
    return data
  packed = pack_rows(data)
  logging.info("packed %d examples into %d rows of %d (%.1f%% real tokens, %.1f%% one per row)",
               len(data["tokens"]), len(packed["tokens"]), packed["tokens"].shape[1],
               100 * useful_fraction(packed), 100 * useful_fraction(data))
  return packed


def useful_fraction(data: dict) -> float:
  """Real (not padding) tokens over all the set's token slots."""
  real = (data["segment_ids"] > 0).sum() if "segment_ids" in data else example_lengths(data).sum()
  return float(real / max(1, data["tokens"].size))


def state_items(state: TrainState) -> dict:
  """The state as checkpoint items: `params` alone can be restored for evaluation."""
  return {"params": state.params, "train": {"step": state.step, "opt_state": state.opt_state}}


def state_from_items(items: dict) -> TrainState:
  return TrainState(items["train"]["step"], items["params"], items["train"]["opt_state"])


def train(cfg, tc: TrainConfig, data: dict, workdir: str, mesh, *, loss_fn: LossFn | None = None,
          init_fn: Callable | None = None, init_params=None,
          validate: Callable[[Any], float] | None = None, rules=partitioning.DEFAULT_RULES,
          log: Callable[[dict], None] | None = None, progress: Callable | None = None):
  """Trains for `tc.total_steps`, resuming from `workdir/checkpoints` if present.

  `loss_fn(params, batch) -> (loss sum, weight sum, {name: sum})` defaults to
  the policy's reward-weighted NLL (`nll_loss(cfg)`); `init_fn(rng)` (boxed
  parameters, default the decoder's) gives the state's structure and, without
  `init_params`, its starting point.  `validate(params) -> float` (higher is
  better) runs every `eval_every` steps and at the end; orbax keeps the best
  step (`best_fn`) beside the latest ones.  Returns (best_params, best_score,
  final_state); without `validate`, the final parameters and None.  With
  several processes every host computes the same global batch and places the
  shards of its own devices.
  """
  loss_fn = loss_fn or nll_loss(cfg)
  data = prepare(data, tc, loss_fn)
  init_fn = init_fn or functools.partial(model_lib.init_params, cfg)
  if tc.batch_size % tc.grad_accum:
    raise ValueError(f"TrainConfig: batch_size {tc.batch_size} is not divisible by "
                     f"grad_accum {tc.grad_accum}")
  dp = partitioning.data_parallel_size(mesh)
  if (tc.batch_size // tc.grad_accum) % dp:
    raise ValueError(f"TrainConfig: micro-batch {tc.batch_size // tc.grad_accum} is not "
                     f"divisible by the mesh's data-parallel size {dp}")
  ckpt = checkpoints.manager(os.path.join(workdir, "checkpoints"), tc.keep_checkpoints,
                             best_metric="validation" if validate else None)
  state, shardings = create_state(init_fn, tc, mesh, params=init_params, rules=rules)
  if ckpt.latest_step() is not None:
    state = state_from_items(checkpoints.restore(ckpt, ckpt.latest_step(), state_items(state)))
    logging.info("resumed from step %d", int(state.step))
  step_fn = jit_train_step(loss_fn, tc, mesh, shardings, rules)
  in_sharding = batch_sharding(mesh, rules)

  def save(state, metrics=None):
    checkpoints.save(ckpt, int(state.step), state_items(state), metrics)

  def validate_and_save(state):
    score = float(validate(state.params))
    if log:
      log({"step": int(state.step), "validation": score})
    save(state, {"validation": score})

  start = int(state.step)
  t0 = time.time()
  for step in range(start, tc.total_steps):
    batch = batch_for_step(data, step, tc.batch_size, tc.seed)
    batch = jax.tree.map(lambda x: multihost.global_array(x, in_sharding), batch)
    state, metrics = step_fn(state, batch)
    done = step + 1
    if log and (done % tc.log_every == 0 or done == tc.total_steps):
      m = {k: float(v) for k, v in jax.device_get(metrics).items()}
      log({"step": done, **m, "steps_per_s": (done - start) / (time.time() - t0)})
    if progress:
      progress(done)
    if validate and (done % tc.eval_every == 0 or done == tc.total_steps):
      validate_and_save(state)
    elif done % tc.checkpoint_every == 0:
      save(state)
  if validate and (ckpt.latest_step() != int(state.step) or ckpt.metrics(int(state.step)) is None):
    validate_and_save(state)  # nothing trained, or resumed where the final step has no score
  ckpt.wait_until_finished()
  if validate is None:
    return state.params, None, state
  best_step, score = checkpoints.best_score(ckpt, "validation")
  best = checkpoints.restore(ckpt, best_step, {"params": state.params})["params"]
  return best, score, state
