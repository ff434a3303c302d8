"""Rollouts: what the policy sampled, as token ids, and what the verifier said.

One record per batch of problems flows from the sampler to the verifier to the
trainer.  Text is derived from the tokens (for the verifier and for people);
the M-step trains on the token ids the policy actually produced, never on
re-encoded text (with a BPE tokenizer, encode(decode(ids)) != ids in general).

Shapes: P problems, S samples per problem, T max new tokens, L prompt length.

    r = rollouts.sample(model_cfg, params, vocab, records, sc, stop=task.stop)
    r = rollouts.verify(r, records, task.verifier, vocab, stop=task.stop)
    keep = rollouts.select(r, max_per_problem=10)          # [P, S] bool
    data = rollouts.examples(r, keep, vocab.eos_id, max_len=1024)

How a policy runs is an `Engine` (architecture, vocabulary, mesh, batch size):
`rollout(engine, ...)` samples and verifies a list of problems, `collect(...)`
does it batch by batch into resumable files (the E-step; reward-model samples).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import jax
import numpy as np

from restem_jax import files, multihost, sampling
from restem_jax.examples import policy_examples
from restem_jax import model as model_lib


@dataclasses.dataclass(frozen=True)
class Rollouts:
  problem_ids: np.ndarray  # [P] str
  prompt_tokens: np.ndarray  # [P, L] int32, right-padded with 0
  prompt_lengths: np.ndarray  # [P] int32
  tokens: np.ndarray  # [P, S, T] int32: completions as sampled (EOS included), 0 after
  lengths: np.ndarray  # [P, S] int32: tokens of the completion, to its stop string; EOS excluded
  logprobs: np.ndarray  # [P, S, T] float32: log p(token) under the policy (temperature 1)
  rewards: np.ndarray  # [P, S] float32; NaN until verified
  statuses: np.ndarray  # [P, S] str: the verifier's verdict; "" until verified
  answers: np.ndarray  # [P, S] str: the normalised final answer (majority-vote key); "" if none

  @property
  def num_problems(self) -> int:
    return len(self.problem_ids)

  @property
  def num_samples(self) -> int:
    return self.tokens.shape[1]

  @property
  def verified(self) -> bool:
    return not np.isnan(self.rewards).any()

  def prompt(self, i: int) -> list[int]:
    return self.prompt_tokens[i, :self.prompt_lengths[i]].tolist()

  def completion(self, i: int, j: int) -> list[int]:
    return self.tokens[i, j, :self.lengths[i, j]].tolist()

  def texts(self, vocab, stop: Sequence[str] = ()) -> list[list[str]]:
    """[P][S] completion texts, cut before the first stop string."""
    return [[cut_at_stop(vocab.decode(self.completion(i, j)), stop) for j in range(self.num_samples)]
            for i in range(self.num_problems)]


def _stops(stop) -> tuple:
  return tuple(s for s in ((stop,) if isinstance(stop, str) else tuple(stop)) if s)


def cut_at_stop(text: str, stop: Sequence[str] | str) -> str:
  cuts = [text.index(s) for s in _stops(stop) if s in text]
  return text[:min(cuts)] if cuts else text


def stop_length(vocab, ids: Sequence[int], stop: Sequence[str] | str) -> int:
  """Fewest leading tokens whose text holds a stop string (all, if none does).
  The token that completes the stop string is kept: that is what was sampled."""
  stops = _stops(stop)
  has_stop = lambda n: any(s in vocab.decode(ids[:n]) for s in stops)  # noqa: E731
  if not stops or not has_stop(len(ids)):
    return len(ids)
  lo, hi = 1, len(ids)
  while lo < hi:
    mid = (lo + hi) // 2
    lo, hi = (lo, mid) if has_stop(mid) else (mid + 1, hi)
  return lo


def _pad_rows(rows: Sequence[Sequence[int]], width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  width = max([len(r) for r in rows] + [1]) if width is None else width
  out = np.zeros((len(rows), width), np.int32)
  for i, r in enumerate(rows):
    out[i, :len(r)] = r
  return out, np.asarray([len(r) for r in rows], np.int32)


def sample(model_cfg: model_lib.ModelConfig, params, vocab, records: Sequence[dict],
           sc: sampling.SamplingConfig, *, stop: Sequence[str] | str = (), rng=0,
           batch_size: int = 64, mesh=None, progress=None) -> Rollouts:
  """Samples `sc.num_samples` completions for each record's `prompt` (unverified)."""
  prompts = [vocab.encode(r["prompt"]) for r in records]
  out = sampling.sample(model_cfg, params, prompts, sc, eos_id=vocab.eos_id, pad_id=0, rng=rng,
                        batch_size=batch_size, mesh=mesh, progress=progress)
  stops = _stops(stop) + _stops(sc.stop)
  ended = (out.lengths > 0) & (np.take_along_axis(
      out.tokens, np.maximum(out.lengths - 1, 0)[..., None], -1)[..., 0] == vocab.eos_id)
  lengths = out.lengths - ended
  if stops:
    for i, j in np.ndindex(lengths.shape):
      lengths[i, j] = stop_length(vocab, out.tokens[i, j, :lengths[i, j]].tolist(), stops)
  prompt_tokens, prompt_lengths = _pad_rows(prompts)
  shape = lengths.shape
  return Rollouts(np.asarray([str(r["id"]) for r in records]), prompt_tokens, prompt_lengths,
                  out.tokens, lengths.astype(np.int32), out.logprobs,
                  np.full(shape, np.nan, np.float32), np.full(shape, "", dtype="<U1"),
                  np.full(shape, "", dtype="<U1"))


def verify(r: Rollouts, records: Sequence[dict], verifier, vocab, *, stop: Sequence[str] | str = (),
           workers: int | None = None, progress: bool = False) -> Rollouts:
  """Scores every completion with `verifier` (on the host, in parallel)."""
  from restem_jax import verifiers
  if [str(x["id"]) for x in records] != r.problem_ids.tolist():
    raise ValueError("verify: records do not match the rollouts' problem ids")
  texts = r.texts(vocab, stop)
  flat = [(rec, t) for rec, ts in zip(records, texts) for t in ts]
  # with several processes each host verifies every P-th sample, and all get all verdicts
  results = multihost.split_map(
      lambda items: verifiers.verify_batch(verifier, items, workers=workers, progress=progress,
                                           desc="verifying")[1], flat,
      encode=lambda x: [x.reward, x.status, x.answer or ""],
      decode=lambda x: verifiers.Result(x[0], x[1], answer=x[2]))
  shape = (r.num_problems, r.num_samples)
  return dataclasses.replace(
      r, rewards=np.asarray([x.reward for x in results], np.float32).reshape(shape),
      statuses=np.asarray([x.status for x in results], dtype=str).reshape(shape),
      answers=np.asarray([x.answer or "" for x in results], dtype=str).reshape(shape))


def with_prompts(r: Rollouts, records: Sequence[dict], vocab) -> Rollouts:
  """`r` behind `records`' prompts (the same problems, e.g. zero-shot where `r`
  was sampled with few-shot prompts): what a trainer or a reward model reads."""
  if [str(x["id"]) for x in records] != r.problem_ids.tolist():
    raise ValueError("with_prompts: records do not match the rollouts' problem ids")
  prompt_tokens, prompt_lengths = _pad_rows([vocab.encode(x["prompt"]) for x in records])
  return dataclasses.replace(r, prompt_tokens=prompt_tokens, prompt_lengths=prompt_lengths)


def _distinct_rewarded(r: Rollouts, max_per_problem: int, order) -> np.ndarray:
  """[P, S] mask: each problem's first `max_per_problem` distinct rewarded samples,
  taken in the order `order(i)` gives the problem's sample indices."""
  keep = np.zeros(r.rewards.shape, bool)
  for i in range(r.num_problems):
    seen = set()
    for j in order(i):
      c = tuple(r.completion(i, j))
      if r.rewards[i, j] > 0 and c not in seen and len(seen) < max_per_problem:
        seen.add(c)
        keep[i, j] = True
  return keep


def select(r: Rollouts, max_per_problem: int) -> np.ndarray:
  """[P, S] mask: each problem's first `max_per_problem` distinct rewarded samples."""
  return _distinct_rewarded(r, max_per_problem, lambda i: range(r.num_samples))


def select_shortest(r: Rollouts, max_per_problem: int) -> np.ndarray:
  """[P, S] mask: each problem's `max_per_problem` shortest distinct rewarded samples
  (fewest tokens; ties to the earlier sample)."""
  return _distinct_rewarded(r, max_per_problem,
                            lambda i: sorted(range(r.num_samples), key=lambda j: (int(r.lengths[i, j]), j)))


def examples(r: Rollouts, keep: np.ndarray, eos_id: int, max_len: int,
             prompts: Sequence[Sequence[int]] | None = None) -> dict:
  """The kept samples as a training set: prompt + sampled completion + EOS.
  `prompts` (token ids per problem) replace the prompts they were sampled
  with: sample with few-shot prompts, train on zero-shot ones."""
  idx = list(zip(*np.nonzero(keep)))
  prompt = (lambda i: list(prompts[i])) if prompts is not None else r.prompt  # noqa: E731
  return policy_examples([prompt(i) for i, _ in idx], [r.completion(i, j) for i, j in idx],
                                [float(r.rewards[i, j]) for i, j in idx], eos_id, max_len)


def save(r: Rollouts, path: str) -> None:
  """Atomically writes `path` (.npz); with several processes only process 0 writes."""
  if not multihost.is_writer():
    return
  with files.atomic(path, "wb") as f:
    np.savez(f, **{field.name: getattr(r, field.name) for field in dataclasses.fields(Rollouts)})


def load(path: str) -> Rollouts:
  with np.load(path, allow_pickle=False) as z:
    return Rollouts(**{f.name: z[f.name] for f in dataclasses.fields(Rollouts)})


def concat(parts: Sequence[Rollouts]) -> Rollouts:
  """Rollouts of several batches (same S and T) as one."""
  width = max(p.prompt_tokens.shape[1] for p in parts)
  padded = [dataclasses.replace(p, prompt_tokens=np.pad(p.prompt_tokens, ((0, 0), (0, width - p.prompt_tokens.shape[1]))))
            for p in parts]
  return Rollouts(**{f.name: np.concatenate([getattr(p, f.name) for p in padded])
                     for f in dataclasses.fields(Rollouts)})


@dataclasses.dataclass(frozen=True)
class Engine:
  """How a policy is run: its architecture, vocabulary and mesh, prompts per
  sampler call, verifier workers (None: one per core)."""
  model: model_lib.ModelConfig
  vocab: object
  mesh: object = None
  batch_size: int = 64
  workers: int | None = None


def rollout(engine: Engine, params, task, records: Sequence[dict], sc: sampling.SamplingConfig, *,
            seed: int = 0, desc: str = "") -> Rollouts:
  """Samples and verifies completions of `records` (a progress bar with `desc`)."""
  from tqdm.auto import tqdm
  with tqdm(total=len(records), desc=desc or task.name, unit="problem", leave=False,
            disable=None) as bar:
    def progress(n):
      bar.n = n
      bar.refresh()
    r = sample(engine.model, params, engine.vocab, records, sc, stop=task.stop, rng=seed,
               batch_size=engine.batch_size, mesh=engine.mesh, progress=progress)
  # the verifier sees the text cut where the tokens were: the task's stop and the sampler's
  return verify(r, records, task.verifier, engine.vocab, stop=(task.stop, *sc.stop),
                workers=engine.workers, progress=True)


def collect(engine: Engine, params, task, problems: list[dict], sc: sampling.SamplingConfig,
            out_dir: str, rng) -> Rollouts:
  """Verified rollouts of every problem (the E-step; a reward model's samples), one file
  per batch of `engine.batch_size` problems in `out_dir`; resumes at the first missing file."""
  from tqdm.auto import tqdm
  os.makedirs(out_dir, exist_ok=True)
  bs = engine.batch_size
  parts = []
  for b in tqdm(range(-(-len(problems) // bs)), desc="E-step", unit="batch", leave=False, disable=None):
    path = os.path.join(out_dir, f"batch_{b:05d}.npz")
    batch = problems[b * bs:(b + 1) * bs]
    if os.path.exists(path):
      r = load(path)
      if r.problem_ids.tolist() != [str(p["id"]) for p in batch]:
        raise ValueError(f"{path}: holds other problems than this run's batch {b}; "
                         "the task or sample_batch_size changed: use a new run directory")
    else:
      r = rollout(engine, params, task, batch, sc, seed=jax.random.fold_in(rng, b), desc=f"batch {b}")
      save(r, path)
    parts.append(r)
  return concat(parts)
