"""The decoder: a Llama / Qwen2 / Mistral-family transformer in one file.

One module serves training (full causal forward) and sampling (prefill into a
KV cache, then one token per step).  Every parameter carries logical axis
names (see `partitioning.py` for the table that maps them onto a mesh) and the
main activations carry sharding constraints.

Shape suffixes: B batch, L query length, S key/cache length, D d_model,
H query heads, K kv heads, G = H // K, E head dim, F mlp dim, V vocab;
C rows of a shared prefix, N = B // C rows per prefix row, P prefix length.

Cache layout: each layer keeps `k` [B, K, E, S] and `v` [B, K, S, E] (batch and
kv head first, keys transposed, so attention needs no transposes of the cache).  Prompts are
left-padded so that every row writes at the same `cache_index`; `kv_mask_BxS`
says which cache slots hold real tokens.  Positions (for rotary embeddings)
are per token, so left padding does not shift them.

Shared prefix (sampling many completions of one prompt): `prefix` holds the
prompt's cache once per prompt (C rows; rows c*N .. c*N+N-1 of the batch
continue prompt c), and `cache` only the generated slots P.. .  Attention
reads the prompt's keys once per prompt instead of once per sample.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
Cache = list  # one {"k": [B,K,E,S], "v": [B,K,S,E]} dict per layer
CACHE_NAMES = {"k": ("batch", "act_kv_heads", "kv", "length"), "v": ("batch", "act_kv_heads", "length", "kv")}
CACHE_LENGTH_AXIS = {"k": 3, "v": 2}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture of the decoder (defaults: the tiny built-in model)."""
  vocab_size: int = 259
  d_model: int = 128
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int = 2
  head_dim: int | None = None  # default d_model // num_heads
  mlp_dim: int = 384
  rope_theta: float = 10_000.0
  rms_eps: float = 1e-6
  tie_embeddings: bool = True
  qkv_bias: bool = False  # Qwen2
  sliding_window: int | None = None  # Mistral
  dtype: str = "float32"  # compute dtype ("bfloat16" on accelerators)
  param_dtype: str = "float32"
  remat: bool = False
  init_std: float = 0.02

  @property
  def dim_per_head(self) -> int:
    return self.head_dim or self.d_model // self.num_heads

  def num_params(self) -> int:
    d, e, f, v = self.d_model, self.dim_per_head, self.mlp_dim, self.vocab_size
    h, k = self.num_heads, self.num_kv_heads
    attn = d * e * (2 * h + 2 * k) + (e * (h + 2 * k) if self.qkv_bias else 0)
    per_layer = attn + 3 * d * f + 2 * d
    head = 0 if self.tie_embeddings else d * v
    return v * d + self.num_layers * per_layer + d + head


def _param(mod: nn.Module, name: str, names: tuple, shape: tuple, init=None):
  cfg = mod.cfg
  init = init or nn.initializers.normal(cfg.init_std)
  return mod.param(name, nn.with_logical_partitioning(init, names), shape,
                   jnp.dtype(cfg.param_dtype))


def constrain(x: Array, names: tuple) -> Array:
  """Sharding constraint by logical names (no-op outside a mesh + rules)."""
  return nn.with_logical_constraint(x, names)


class RMSNorm(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x):
    w = _param(self, "scale", ("norm",), (x.shape[-1],), nn.initializers.ones)
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + self.cfg.rms_eps)
    return w.astype(x.dtype) * x32.astype(x.dtype)


def rope(x_BxLxNxE: Array, positions_BxL: Array, theta: float) -> Array:
  """Rotary embedding, Hugging Face (rotate-half) convention: x * cos + rotate_half(x) * sin,
  with rotate_half(x) = [-x2, x1] written as a roll and a sign (no concatenation of x)."""
  e = x_BxLxNxE.shape[-1]
  inv_freq_E2 = 1.0 / (theta ** (jnp.arange(0, e, 2, dtype=jnp.float32) / e))
  ang_BxLxE = positions_BxL.astype(jnp.float32)[..., None] * jnp.tile(inv_freq_E2, 2)
  sign_E = jnp.where(jnp.arange(e) < e // 2, -1.0, 1.0)
  cos = jnp.cos(ang_BxLxE)[:, :, None, :]
  sin = (jnp.sin(ang_BxLxE) * sign_E)[:, :, None, :]
  x = x_BxLxNxE.astype(jnp.float32)
  return (x * cos + jnp.roll(x, e // 2, axis=-1) * sin).astype(x_BxLxNxE.dtype)


def attention_mask(q_index_L: Array, kv_mask_BxS: Array,
                   sliding_window: int | None, segment_ids_BxL: Array | None = None) -> Array:
  """[B, L, S] boolean: causal (in cache coordinates) and real keys only; with
  segment ids (packed rows, no cache) a query sees only its own segment."""
  k_index_S = jnp.arange(kv_mask_BxS.shape[1])
  causal_LxS = k_index_S[None, :] <= q_index_L[:, None]
  if sliding_window:
    causal_LxS &= q_index_L[:, None] - k_index_S[None, :] < sliding_window
  mask_BxLxS = causal_LxS[None] & kv_mask_BxS[:, None, :].astype(bool)
  if segment_ids_BxL is not None:
    mask_BxLxS &= segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :]
  return mask_BxLxS


def _attend_with_prefix(q_BxKxGLxE, s_BxKxGxLxS, v_BxKxSxE, mask_BxLxS, prefix, dt):
  """Attention over a shared prompt prefix (a cache of C rows; rows c*N .. c*N+N-1 of
  the batch continue prompt c) and each row's own cache, softmax-merged from the
  two parts' maxima and sums (no [B, ..., P + S] concatenation or its transposes)."""
  b, k, gl, e = q_BxKxGLxE.shape
  _, _, g, l, _ = s_BxKxGxLxS.shape
  c, pl = prefix["v"].shape[0], prefix["v"].shape[2]
  n = b // c
  q_CxKxNGLxE = q_BxKxGLxE.reshape(c, n, k, gl, e).transpose(0, 2, 1, 3, 4).reshape(c, k, n * gl, e)
  s_CxKxNxGxLxP = jnp.einsum("ckqe,ckep->ckqp", q_CxKxNGLxE, prefix["k"].astype(dt),
                             preferred_element_type=jnp.float32).reshape(c, k, n, g, l, pl)
  # every row of a prompt sees the same prompt slots
  mask_Cx1x1x1xLxP = mask_BxLxS[::n, :, :pl][:, None, None, None]
  s_CxKxNxGxLxP = jnp.where(mask_Cx1x1x1xLxP, s_CxKxNxGxLxP, -1e30)
  m_CxKxNxGxLx1 = jnp.max(s_CxKxNxGxLxP, -1, keepdims=True)
  e_CxKxNxGxLxP = jnp.exp(s_CxKxNxGxLxP - m_CxKxNxGxLx1)
  o_CxKxNGLxE = jnp.einsum("ckqp,ckpe->ckqe", e_CxKxNxGxLxP.reshape(c, k, n * gl, pl).astype(dt),
                           prefix["v"].astype(dt), preferred_element_type=jnp.float32)
  to_b = lambda x: x.reshape(c, k, n, g, l, -1).transpose(0, 2, 1, 3, 4, 5).reshape(b, k, g, l, -1)  # noqa: E731
  m_pre_BxKxGxLx1 = to_b(m_CxKxNxGxLx1)
  sum_pre_BxKxGxLx1 = to_b(jnp.sum(e_CxKxNxGxLxP, -1, keepdims=True))
  o_pre_BxKxGxLxE = to_b(o_CxKxNGLxE)
  s_BxKxGxLxS = jnp.where(mask_BxLxS[:, None, None, :, pl:], s_BxKxGxLxS, -1e30)
  m_BxKxGxLx1 = jnp.maximum(jnp.max(s_BxKxGxLxS, -1, keepdims=True), m_pre_BxKxGxLx1)
  e_BxKxGxLxS = jnp.exp(s_BxKxGxLxS - m_BxKxGxLx1)
  scale_BxKxGxLx1 = jnp.exp(m_pre_BxKxGxLx1 - m_BxKxGxLx1)
  o_own_BxKxGxLxE = jnp.einsum("bkgls,bkse->bkgle", e_BxKxGxLxS.astype(dt), v_BxKxSxE,
                               preferred_element_type=jnp.float32)
  total_BxKxGxLx1 = jnp.sum(e_BxKxGxLxS, -1, keepdims=True) + scale_BxKxGxLx1 * sum_pre_BxKxGxLx1
  o_BxKxGxLxE = (o_own_BxKxGxLxE + scale_BxKxGxLx1 * o_pre_BxKxGxLxE) / total_BxKxGxLx1
  return o_BxKxGxLxE.astype(dt).reshape(b, k, gl, e)


class Attention(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD, positions_BxL, mask_BxLxS, cache, cache_index, prefix=None):
    cfg = self.cfg
    d, e, h, k = cfg.d_model, cfg.dim_per_head, cfg.num_heads, cfg.num_kv_heads
    dt = jnp.dtype(cfg.dtype)
    wq = _param(self, "q_proj", ("embed", "heads", "kv"), (d, h, e))
    wk = _param(self, "k_proj", ("embed", "kv_heads", "kv"), (d, k, e))
    wv = _param(self, "v_proj", ("embed", "kv_heads", "kv"), (d, k, e))
    wo = _param(self, "o_proj", ("heads", "kv", "embed"), (h, e, d))
    x = x_BxLxD.astype(dt)
    q_BxLxHxE = jnp.einsum("bld,dhe->blhe", x, wq.astype(dt))
    k_BxLxKxE = jnp.einsum("bld,dke->blke", x, wk.astype(dt))
    v_BxLxKxE = jnp.einsum("bld,dke->blke", x, wv.astype(dt))
    if cfg.qkv_bias:
      zeros = nn.initializers.zeros
      q_BxLxHxE += _param(self, "q_bias", ("heads", "kv"), (h, e), zeros).astype(dt)
      k_BxLxKxE += _param(self, "k_bias", ("kv_heads", "kv"), (k, e), zeros).astype(dt)
      v_BxLxKxE += _param(self, "v_bias", ("kv_heads", "kv"), (k, e), zeros).astype(dt)
    q_BxLxHxE = constrain(rope(q_BxLxHxE, positions_BxL, cfg.rope_theta),
                          ("batch", "length", "act_heads", "kv"))
    k_BxLxKxE = rope(k_BxLxKxE, positions_BxL, cfg.rope_theta)

    k_BxKxLxE = k_BxLxKxE.transpose(0, 2, 1, 3)
    v_BxKxLxE = v_BxLxKxE.transpose(0, 2, 1, 3)
    b, l = x.shape[:2]
    g = h // k
    # (batch, kv head) lead in every operand: no transposes of the cache.
    # (1/sqrt(e) on the queries, not on the [.., S] scores)
    q_BxKxGLxE = (q_BxLxHxE.reshape(b, l, k, g, e).transpose(0, 2, 3, 1, 4).reshape(b, k, g * l, e)
                  * jnp.asarray(1 / math.sqrt(e), dt))
    if cache is not None:  # write this chunk at cache_index, attend over the cache
      p = 0 if prefix is None else prefix["v"].shape[2]  # the cache holds slots p.. then
      k_BxKxExS = jax.lax.dynamic_update_slice(
          cache["k"], k_BxKxLxE.transpose(0, 1, 3, 2).astype(cache["k"].dtype), (0, 0, 0, cache_index - p))
      v_BxKxSxE = jax.lax.dynamic_update_slice(
          cache["v"], v_BxKxLxE.astype(cache["v"].dtype), (0, 0, cache_index - p, 0))
      cache = {"k": k_BxKxExS, "v": v_BxKxSxE}
      k_BxKxExS = constrain(k_BxKxExS.astype(dt), CACHE_NAMES["k"])
      s_BxKxGLxS = jnp.einsum("bkqe,bkes->bkqs", q_BxKxGLxE, k_BxKxExS, preferred_element_type=jnp.float32)
    else:
      v_BxKxSxE = v_BxKxLxE
      k_BxKxSxE = constrain(k_BxKxLxE.astype(dt), CACHE_NAMES["v"])  # the values' [B, K, S, E] layout
      s_BxKxGLxS = jnp.einsum("bkqe,bkse->bkqs", q_BxKxGLxE, k_BxKxSxE, preferred_element_type=jnp.float32)
    v_BxKxSxE = constrain(v_BxKxSxE.astype(dt), CACHE_NAMES["v"])
    s_BxKxGxLxS = s_BxKxGLxS.reshape(b, k, g, l, -1)
    if prefix is None:
      s_BxKxGxLxS = jnp.where(mask_BxLxS[:, None, None], s_BxKxGxLxS, -1e30)
      p_BxKxGLxS = jax.nn.softmax(s_BxKxGxLxS, axis=-1).astype(dt).reshape(b, k, g * l, -1)
      o_BxKxGLxE = jnp.einsum("bkqs,bkse->bkqe", p_BxKxGLxS, v_BxKxSxE)
    else:
      o_BxKxGLxE = _attend_with_prefix(q_BxKxGLxE, s_BxKxGxLxS, v_BxKxSxE, mask_BxLxS, prefix, dt)
    # heads and head dim flattened on both sides: a plain [B*L, H*E] x [H*E, D] matmul (as an
    # einsum over (h, e), XLA transposed the weight inside the decode loop at every step)
    o_BxLxHE = o_BxKxGLxE.reshape(b, k, g, l, e).transpose(0, 3, 1, 2, 4).reshape(b, l, h * e)
    out_BxLxD = o_BxLxHE @ wo.astype(dt).reshape(h * e, d)
    return constrain(out_BxLxD, ("batch", "length", "act_embed")), cache


class Mlp(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD):
    cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
    w_gate = _param(self, "gate_proj", ("embed", "mlp"), (cfg.d_model, cfg.mlp_dim))
    w_up = _param(self, "up_proj", ("embed", "mlp"), (cfg.d_model, cfg.mlp_dim))
    w_down = _param(self, "down_proj", ("mlp", "embed"), (cfg.mlp_dim, cfg.d_model))
    x = x_BxLxD.astype(dt)
    h_BxLxF = jax.nn.silu(x @ w_gate.astype(dt)) * (x @ w_up.astype(dt))
    h_BxLxF = constrain(h_BxLxF, ("batch", "length", "act_mlp"))
    return constrain(h_BxLxF @ w_down.astype(dt), ("batch", "length", "act_embed"))


class Block(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x_BxLxD, positions_BxL, mask_BxLxS, cache, cache_index, prefix=None):
    h, cache = Attention(self.cfg, name="attn")(
        RMSNorm(self.cfg, name="attn_norm")(x_BxLxD), positions_BxL, mask_BxLxS,
        cache, cache_index, prefix)
    x_BxLxD = x_BxLxD + h
    x_BxLxD = x_BxLxD + Mlp(self.cfg, name="mlp")(RMSNorm(self.cfg, name="mlp_norm")(x_BxLxD))
    return x_BxLxD, cache


class Decoder(nn.Module):
  """tokens [B, L] -> logits [B, L, V] (float32), updated cache."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens_BxL, positions_BxL=None, kv_mask_BxS=None,
               cache: Cache | None = None, cache_index: Any = 0, prefix: Cache | None = None,
               return_hidden: bool = False, last_only: bool = False, segment_ids_BxL=None,
               ring: bool = False):
    """`return_hidden`: the final normalised hidden states [B, L, D] instead of
    logits (reward models put their own head on them); `last_only`: logits of
    the last position only, [B, 1, V] (a prefill needs no more);
    `segment_ids_BxL` (packed rows, with their `positions_BxL` restarting at
    each segment; no cache): attention stays within each segment.  `ring`: the
    cache is a ring buffer whose rows started at different steps (the sampler's
    refill); `kv_mask_BxS` alone says which slots a one-token step sees."""
    cfg = self.cfg
    b, l = tokens_BxL.shape
    if positions_BxL is None:
      positions_BxL = jnp.broadcast_to(jnp.arange(l), (b, l))
    if kv_mask_BxS is None:
      kv_mask_BxS = jnp.ones((b, l if cache is None else cache[0]["v"].shape[2]), bool)
    if prefix is not None and (cache is None or b % prefix[0]["k"].shape[0]):
      raise ValueError("a shared prefix needs a cache and a batch that is a multiple of its rows")
    if segment_ids_BxL is not None and cache is not None:
      raise ValueError("segment ids (packed rows) are for training: no cache")
    if ring:
      if cache is None or l != 1 or prefix is not None:
        raise ValueError("a ring cache takes one token per row, without a shared prefix")
      if cfg.sliding_window and kv_mask_BxS.shape[1] > cfg.sliding_window:
        raise ValueError(f"a ring cache of {kv_mask_BxS.shape[1]} slots is wider than the "
                         f"sliding window {cfg.sliding_window}")
      mask_BxLxS = kv_mask_BxS[:, None, :].astype(bool)
    else:
      q_index_L = cache_index + jnp.arange(l)
      mask_BxLxS = attention_mask(q_index_L, kv_mask_BxS, cfg.sliding_window, segment_ids_BxL)

    embed_VxD = _param(self, "embed", ("vocab", "embed"), (cfg.vocab_size, cfg.d_model))
    x_BxLxD = jnp.take(embed_VxD, tokens_BxL, axis=0).astype(jnp.dtype(cfg.dtype))
    x_BxLxD = constrain(x_BxLxD, ("batch", "length", "act_embed"))
    block_cls = nn.remat(Block) if cfg.remat else Block
    new_cache = []
    for i in range(cfg.num_layers):
      layer_cache = None if cache is None else cache[i]
      x_BxLxD, layer_cache = block_cls(cfg, name=f"layer_{i}")(
          x_BxLxD, positions_BxL, mask_BxLxS, layer_cache, cache_index,
          None if prefix is None else prefix[i])
      new_cache.append(layer_cache)
    if last_only and not return_hidden:
      x_BxLxD = x_BxLxD[:, -1:]
    x_BxLxD = RMSNorm(cfg, name="final_norm")(x_BxLxD)
    if return_hidden:
      return x_BxLxD, (None if cache is None else new_cache)
    if cfg.tie_embeddings:  # contract with the embedding as stored: no [D, V] transpose per call
      logits_BxLxV = jnp.einsum("bld,vd->blv", x_BxLxD, embed_VxD.astype(x_BxLxD.dtype),
                                preferred_element_type=jnp.float32)
    else:
      head_DxV = _param(self, "lm_head", ("embed", "vocab"), (cfg.d_model, cfg.vocab_size))
      logits_BxLxV = jnp.einsum("bld,dv->blv", x_BxLxD, head_DxV.astype(x_BxLxD.dtype),
                                preferred_element_type=jnp.float32)
    logits_BxLxV = constrain(logits_BxLxV, ("batch", "length", "act_vocab"))
    return logits_BxLxV, (None if cache is None else new_cache)


def init_cache(cfg: ModelConfig, batch: int, length: int) -> Cache:
  """Zeros: keys [B, K, E, S] (transposed, so that scores need no transpose: 3x
  faster than [B, K, S, E] on CPU for a 128-slot decode), values [B, K, S, E]."""
  dt = jnp.dtype(cfg.dtype)
  e, k = cfg.dim_per_head, cfg.num_kv_heads
  return [{"k": jnp.zeros((batch, k, e, length), dt), "v": jnp.zeros((batch, k, length, e), dt)}
          for _ in range(cfg.num_layers)]


def init_params(cfg: ModelConfig, rng: Array):
  """Boxed (logically partitioned) parameters; `nn.unbox` them to use."""
  tokens = jnp.zeros((1, 1), jnp.int32)
  return Decoder(cfg).init(rng, tokens)["params"]


def apply(cfg: ModelConfig, params, tokens_BxL, **kw):
  """Forward pass with plain (unboxed) parameters."""
  return Decoder(cfg).apply({"params": params}, tokens_BxL, **kw)
