"""Reward models (Lightman et al. 2023, "Let's Verify Step by Step").

A reward model is the decoder with a 3-way classification head on its final
hidden states (classes NEGATIVE, NEUTRAL, POSITIVE).

ORM: every completion token predicts whether the sample's final answer is
  right (POSITIVE) or wrong (NEGATIVE); a solution's score is P(POSITIVE) at
  its last token.
PRM: the last token of each step predicts that step's label; a solution is
  trained up to and including its first NEGATIVE step; its score is the
  product (or the minimum) over steps of P(step is correct), where NEUTRAL
  counts as correct unless `neutral_is_correct=False`.

Steps are character spans of the completion text; a span's end is mapped to
the token that holds its last character through the tokenizer's offsets
(`encode_with_offsets`) or, for sampled token ids, through the decoded
prefix lengths (`char_ends`), so a label lands on the step's true last token
whatever the tokenizer merges across the separator.  Labels only enter the
loss: the input is the plain prompt + completion tokens.

Training batch (numpy, for `training.train`):
  tokens      [B, L] int32  prompt + completion, right-padded with 0
  labels      [B, L] int32  class at labelled positions
  label_mask  [B, L] int32  1 where a label is trained
  weight      [B]    float  example weight (1.0)
`training.train` packs these several to a row by default (`training.pack_rows`).
"""
from __future__ import annotations

import dataclasses
import functools
import re
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from restem_jax import multihost, training
from restem_jax import model as model_lib

NEGATIVE, NEUTRAL, POSITIVE = 0, 1, 2
RATING_TO_CLASS = {-1: NEGATIVE, 0: NEUTRAL, 1: POSITIVE}


# ----------------------------------------------------------------------------- model


def init_params(cfg: model_lib.ModelConfig, rng):
  """Boxed parameters: {"decoder": the policy's tree, "head": {kernel [D, 3], bias [3]}}."""
  r1, r2 = jax.random.split(rng)
  head = {"kernel": nn.LogicallyPartitioned(jax.random.normal(r2, (cfg.d_model, 3), jnp.dtype(cfg.param_dtype))
                                   * cfg.init_std, names=("embed", None)),
          "bias": nn.LogicallyPartitioned(jnp.zeros((3,), jnp.dtype(cfg.param_dtype)), names=(None,))}
  return {"decoder": model_lib.init_params(cfg, r1), "head": head}


def from_decoder(cfg: model_lib.ModelConfig, decoder_params, rng=None):
  """Unboxed reward-model parameters: a policy's (or a Hugging Face model's)
  decoder with a fresh head."""
  rng = jax.random.key(0) if rng is None else rng
  kernel = jax.random.normal(rng, (cfg.d_model, 3), jnp.dtype(cfg.param_dtype)) * cfg.init_std
  return {"decoder": decoder_params, "head": {"kernel": kernel,
                                               "bias": jnp.zeros((3,), jnp.dtype(cfg.param_dtype))}}


def apply(cfg: model_lib.ModelConfig, params, tokens_BxL, **kw) -> jax.Array:
  """Class logits [B, L, 3] (float32) at every position (`kw`: packed rows'
  `segment_ids_BxL` and `positions_BxL`)."""
  h_BxLxD, _ = model_lib.apply(cfg, params["decoder"], tokens_BxL, return_hidden=True, **kw)
  head = params["head"]
  return (jnp.einsum("bld,dc->blc", h_BxLxD.astype(jnp.float32), head["kernel"].astype(jnp.float32))
          + head["bias"].astype(jnp.float32))


def loss(cfg: model_lib.ModelConfig):
  """Cross-entropy at labelled positions, as `training.train` wants it:
  (sum, weight, {"accuracy": sum})."""
  def loss_fn(params, batch):
    logits_BxLxC = apply(cfg, params, batch["tokens"], **training.segments(batch))
    w_BxL = batch["label_mask"].astype(jnp.float32) * training.token_weights(batch)
    logp = jax.nn.log_softmax(logits_BxLxC)
    nll_BxL = -jnp.take_along_axis(logp, batch["labels"][..., None], -1)[..., 0]
    right_BxL = jnp.argmax(logits_BxLxC, -1) == batch["labels"]
    return jnp.sum(nll_BxL * w_BxL), jnp.sum(w_BxL), {"accuracy": jnp.sum(right_BxL * w_BxL)}
  loss_fn.packable = True  # reads segment ids and per-token rewards (training.prepare)
  return loss_fn


@functools.lru_cache(maxsize=8)
def _probs_fn(cfg):
  return jax.jit(lambda p, t: jax.nn.softmax(apply(cfg, p, t), -1))


def class_probs(cfg, params, tokens: np.ndarray, batch_size: int = 64) -> np.ndarray:
  """[N, L, 3] class probabilities, computed `batch_size` rows at a time (a short
  last chunk is padded to the next power of two, not to `batch_size`)."""
  fn = _probs_fn(cfg)
  out = []
  for i in range(0, len(tokens), batch_size):
    chunk = tokens[i:i + batch_size]
    n = len(chunk)
    rows = min(batch_size, max(8, 1 << (n - 1).bit_length()))
    if rows > n:
      chunk = np.concatenate([chunk, np.zeros((rows - n,) + chunk.shape[1:], chunk.dtype)])
    out.append(multihost.to_host(fn(params, chunk))[:n])
  return np.concatenate(out) if out else np.zeros((0,) + tokens.shape[1:] + (3,), np.float32)


# ----------------------------------------------------------------------------- steps and labels


def step_spans(text: str, separator: str = r"\n+") -> list[tuple[int, int]]:
  """(start, end) character spans of the non-blank pieces between separators."""
  spans, pos = [], 0
  for m in list(re.finditer(separator, text)) + [None]:
    end = len(text) if m is None else m.start()
    piece = text[pos:end]
    if piece.strip():
      lead = len(piece) - len(piece.lstrip())
      spans.append((pos + lead, pos + len(piece.rstrip())))
    if m is not None:
      pos = m.end()
  return spans


def char_ends(vocab, ids: Sequence[int]) -> list[int]:
  """For sampled ids: the length of the decoded text through each token."""
  return [len(vocab.decode(ids[:i + 1])) for i in range(len(ids))]


def last_tokens(token_ends: Sequence[int], span_ends: Sequence[int]) -> list[int]:
  """Index of the token holding each span's last character (the first token
  whose end reaches the span's end); -1 where the tokens end before it."""
  ends = np.asarray(token_ends)
  idx = np.searchsorted(ends, np.asarray(span_ends), side="left")
  return [int(i) if i < len(ends) else -1 for i in idx]


@dataclasses.dataclass(frozen=True)
class Labelled:
  """A solution as token ids with labels: `positions` index `completion`."""
  prompt: tuple
  completion: tuple
  positions: tuple  # PRM: each step's last token; ORM: every completion token
  labels: tuple  # class per position (NEGATIVE / NEUTRAL / POSITIVE), or -1 unlabelled


def cut_at_first_negative(labels: Sequence[int]) -> int:
  """How many steps to train on: through the first NEGATIVE, else all."""
  for i, l in enumerate(labels):
    if l == NEGATIVE:
      return i + 1
  return len(labels)


def prm_example(prompt: Sequence[int], completion: Sequence[int], token_ends: Sequence[int],
                spans: Sequence[tuple[int, int]], labels: Sequence[int] | None) -> Labelled:
  """Step labels on the steps' last tokens, cut after the first negative step.
  labels None: positions only (for scoring)."""
  pos = last_tokens(token_ends, [e for _, e in spans])
  labels = [-1] * len(spans) if labels is None else list(labels)
  if len(labels) != len(spans):
    raise ValueError(f"{len(labels)} labels for {len(spans)} steps")
  keep = [(p, l) for p, l in zip(pos, labels) if p >= 0]
  n = cut_at_first_negative([l for _, l in keep])
  keep = keep[:n]
  return Labelled(tuple(prompt), tuple(completion), tuple(p for p, _ in keep), tuple(l for _, l in keep))


def orm_example(prompt: Sequence[int], completion: Sequence[int], correct: bool | None) -> Labelled:
  label = -1 if correct is None else POSITIVE if correct else NEGATIVE
  n = len(completion)
  return Labelled(tuple(prompt), tuple(completion), tuple(range(n)), (label,) * n)


def pack(examples: Sequence[Labelled], max_len: int) -> dict:
  """Labelled solutions -> a training batch (see the module docstring); positions
  past max_len are dropped, examples left without a position are dropped."""
  examples = [ex for ex in examples
              if any(len(ex.prompt) + i < max_len and l >= 0 for i, l in zip(ex.positions, ex.labels))]
  tokens, _ = positions_batch(examples, max_len)
  labels = np.zeros_like(tokens)
  mask = np.zeros_like(tokens)
  for r, ex in enumerate(examples):
    for i, l in zip(ex.positions, ex.labels):
      if len(ex.prompt) + i < max_len and l >= 0:
        labels[r, len(ex.prompt) + i], mask[r, len(ex.prompt) + i] = l, 1
  return dict(tokens=tokens, labels=labels, label_mask=mask, weight=np.ones(len(examples), np.float32))


def positions_batch(examples: Sequence[Labelled], max_len: int) -> tuple[np.ndarray, list[list[int]]]:
  """Tokens [N, max_len] and each example's score positions (in the row)."""
  tokens = np.zeros((len(examples), max_len), np.int32)
  where = []
  for r, ex in enumerate(examples):
    toks = (list(ex.prompt) + list(ex.completion))[:max_len]
    tokens[r, :len(toks)] = toks
    where.append([len(ex.prompt) + i for i in ex.positions if len(ex.prompt) + i < max_len])
  return tokens, where


# ----------------------------------------------------------------------------- scores


def reduce_steps(step_probs: np.ndarray, reduction: str = "product", neutral_is_correct: bool = True
                 ) -> float:
  """A solution's PRM score from its steps' class probabilities [steps, 3]."""
  p = step_probs[:, POSITIVE] + (step_probs[:, NEUTRAL] if neutral_is_correct else 0.0)
  if len(p) == 0:
    return 1.0
  if reduction == "product":
    return float(np.prod(p))
  if reduction == "min":
    return float(np.min(p))
  raise ValueError(f"unknown PRM reduction {reduction!r} (product | min)")


def scores(cfg, params, examples: Sequence[Labelled], kind: str, *, max_len: int,
           batch_size: int = 64, reduction: str = "product", neutral_is_correct: bool = True
           ) -> tuple[np.ndarray, list[np.ndarray]]:
  """Per solution: its score, and the class probabilities at its positions."""
  tokens, where = positions_batch(examples, max_len)
  # rows sorted by length, each chunk only as wide as its longest row (to a multiple
  # of 16: few shapes to compile): a causal model's outputs at a position do not
  # depend on the padding after it
  lengths = np.minimum([len(ex.prompt) + len(ex.completion) for ex in examples], max_len)
  order = np.argsort(lengths, kind="stable")
  at = {}
  for i in range(0, len(order), batch_size):
    rows = order[i:i + batch_size]
    width = min(max_len, max(16, -(-int(lengths[rows].max()) // 16) * 16))
    probs = class_probs(cfg, params, tokens[rows, :width], batch_size)
    for k, r in enumerate(rows):
      at[int(r)] = probs[k, where[r]] if where[r] else np.zeros((0, 3), np.float32)
  score = kind_of(kind).score
  per_pos = [at[r] for r in range(len(examples))]
  return np.array([score(sp, reduction, neutral_is_correct) for sp in per_pos], np.float32), per_pos


def first_wrong_step(step_probs: np.ndarray, threshold: float = 0.5) -> int:
  """The predicted first wrong step (P(NEGATIVE) > threshold), or -1 for none."""
  bad = np.nonzero(step_probs[:, NEGATIVE] > threshold)[0]
  return int(bad[0]) if len(bad) else -1


# ----------------------------------------------------------------------------- data sources


def from_rollouts(r, vocab, task, kind: str, labelled: bool = True,
                  records: Sequence[dict] | None = None) -> list[Labelled]:
  """Every sample of verified rollouts (problem-major), labelled for `kind`:
  ORM by the verifier's verdict; PRM by the task's exact step labels
  (`task.step_labels`, which read the problem's record: `records`, by id) on
  steps split by `task.step_separator`."""
  k = kind_of(kind)
  if labelled and not r.verified:
    raise ValueError("rollouts are not verified: no labels")
  if k.steps and labelled and task.step_labels is None:
    raise ValueError(f"task {task.name} has no exact step labels (Task.step_labels); "
                     "train its PRM on PRM800K-style step records instead")
  by_id = {str(x["id"]): x for x in records or ()}
  if k.steps and labelled and any(str(i) not in by_id for i in r.problem_ids):
    raise ValueError("from_rollouts: exact step labels need every sample's problem record (records)")
  out = []
  for i in range(r.num_problems):
    prompt, record = r.prompt(i), by_id.get(str(r.problem_ids[i]))
    for j in range(r.num_samples):
      correct = bool(r.rewards[i, j] > 0) if labelled else None
      out.append(k.example(prompt, r.completion(i, j), vocab, task, correct, record))
  return out


def _prm_sample(prompt, completion, vocab, task, correct: bool | None, record: dict | None) -> Labelled:
  """A sampled solution's steps (`task.step_separator`) with the task's exact labels
  (`task.step_labels`; none where `correct` is None)."""
  text = vocab.decode(completion)
  spans = step_spans(text, task.step_separator)
  labels = None if correct is None else [RATING_TO_CLASS[x] for x in task.step_labels(text, spans, correct, record)]
  return prm_example(prompt, completion, char_ends(vocab, completion), spans, labels)


@dataclasses.dataclass(frozen=True)
class Kind:
  """What makes a reward model an ORM or a PRM; the head, the loss and training are
  shared.  A new kind is one more entry in KINDS (`RewardConfig.kind` names it)."""
  name: str
  # (prompt ids, sampled completion ids, vocab, task, verdict or None, problem record) -> Labelled
  example: Callable
  # (class probabilities at its positions [n, 3], reduction, neutral_is_correct) -> a solution's score
  score: Callable
  steps: bool  # labels sit on steps: judged (and kept best) by locating the first wrong one


KINDS = {
    "orm": Kind("orm", lambda p, c, vocab, task, correct, record: orm_example(p, c, correct),
                lambda sp, reduction, neutral: float(sp[-1, POSITIVE]) if len(sp) else 0.5, steps=False),
    "prm": Kind("prm", _prm_sample, lambda sp, reduction, neutral: reduce_steps(sp, reduction, neutral),
                steps=True),
}


def kind_of(name: str) -> Kind:
  if name not in KINDS:
    raise ValueError(f"unknown reward model kind {name!r}; kinds: {tuple(KINDS)}")
  return KINDS[name]


def from_steps(prompt: Sequence[int], steps: Sequence[str], ratings: Sequence, vocab,
               separator: str = "\n") -> Labelled:
  """A PRM example from a solution given as steps with ratings (+1/0/-1/None):
  the steps joined by `separator`, tokenized with offsets."""
  text, spans = "", []
  for k, s in enumerate(steps):
    if k:
      text += separator
    spans.append((len(text), len(text) + len(s.rstrip())))
    text += s
  ids, offsets = vocab.encode_with_offsets(text)
  labels = [-1 if x is None else RATING_TO_CLASS[x] for x in ratings]
  return prm_example(prompt, ids, [e for _, e in offsets], spans, labels)


def convincing_wrong(scores_PxS: np.ndarray, correct_PxS: np.ndarray, per_problem: int) -> np.ndarray:
  """Active learning (Lightman et al. 2023, sec. 4.2): per problem, the
  `per_problem` wrong-answer samples the reward model scores highest: the
  "convincing wrong answers" worth labelling next.  A [P, S] mask."""
  s = np.where(np.asarray(correct_PxS, bool), -np.inf, np.asarray(scores_PxS, np.float64))
  order = np.argsort(-s, axis=1, kind="stable")[:, :per_problem]
  mask = np.zeros(s.shape, bool)
  np.put_along_axis(mask, order, True, axis=1)
  return mask & ~np.asarray(correct_PxS, bool)
