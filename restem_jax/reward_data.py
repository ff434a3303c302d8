"""Reward-model training data, per split: labelled solutions of a policy's
samples (verified; exact step labels where the task's steps are checkable, or
Math-Shepherd's Monte Carlo labels) or of PRM800K's human-rated solutions."""
from __future__ import annotations

import dataclasses
import logging
import os
import re
import zlib
from typing import NamedTuple

import jax
import numpy as np

from restem_jax import reward, rollouts
from restem_jax.files import read_json, write_json
from restem_jax.sampling import SamplingConfig


class Split(NamedTuple):
  """One split's reward-model data."""
  examples: list  # reward.Labelled solutions
  correct: np.ndarray | None  # [len(examples)] bool: the verifier's verdicts (None: PRM800K)


def take(records, n):
  """The first n records (0: all)."""
  return records[:n] if n else records


def rollouts_for(engine, params, task, split: str, limit: int, sc: SamplingConfig, out_dir: str, seed: int,
                 sample_task=None):
  """Verified samples of `split`'s first `limit` problems (resumable, in
  out_dir/split).  With `sample_task` (the same task with other prompts, e.g.
  few-shot) the policy samples behind its prompts, and the rollouts come back
  behind `task`'s: what a reward model reads."""
  recs = take(task.load(split), limit)
  r = rollouts.collect(engine, params, sample_task or task, take((sample_task or task).load(split), limit), sc,
                    os.path.join(out_dir, split),
                    jax.random.fold_in(jax.random.key(seed), zlib.crc32(split.encode())))
  return rollouts.with_prompts(r, recs, engine.vocab) if sample_task is not None else r


def prm800k_examples(task, vocab, split: str, limit: int, per_problem: int = 0,
                     seed: int = 0) -> list[reward.Labelled]:
  """PRM800K solutions of `split` as PRM examples: `limit` problems (0: all) drawn
  at random, at most `per_problem` solutions of each (0: all), in file order."""
  from tasks import prm800k
  recs = prm800k.read(split, task.data_dir)
  rng = np.random.default_rng(seed + zlib.crc32(split.encode()))
  problems = list(dict.fromkeys(r["problem"] for r in recs))
  if limit and limit < len(problems):
    problems = [problems[i] for i in sorted(rng.choice(len(problems), limit, replace=False))]
  rows: dict[str, list[int]] = {p: [] for p in problems}
  for i, r in enumerate(recs):
    if r["problem"] in rows:
      rows[r["problem"]].append(i)
  if per_problem:
    rows = {p: sorted(rng.choice(ix, per_problem, replace=False)) if len(ix) > per_problem else ix
            for p, ix in rows.items()}
  recs = [recs[i] for ix in rows.values() for i in ix]
  return [reward.from_steps(vocab.encode(task.format_prompt(dict(r, solution="", answer=""))),
                            r["steps"], r["ratings"], vocab) for r in recs]


def mc_labels(engine, params, task, r, records, sc: SamplingConfig, seed: int,
              cache: str = "") -> list[reward.Labelled]:
  """Math-Shepherd's automatic PRM labels for tasks whose steps cannot be checked:
  from each step's prefix (prompt + the sample's tokens through the step's last
  token) `sc.num_samples` completions are drawn; the step is POSITIVE if any of
  them reaches a right answer, else NEGATIVE ("hard" estimation).  Solutions
  are cut after their first NEGATIVE step, as every PRM example is.  With
  `cache` (a JSON file) the labels are written there and read back on resume."""
  vocab = engine.vocab
  base = reward.from_rollouts(r, vocab, task, "prm", labelled=False)
  if cache and os.path.exists(cache):
    saved = read_json(cache)
    if len(saved) != len(base) or any(list(ex.positions[:len(pos)]) != pos for ex, (pos, _) in zip(base, saved)):
      raise ValueError(f"{cache}: MC labels of other rollouts than this run's; delete it to relabel")
    return [dataclasses.replace(ex, positions=tuple(pos), labels=tuple(lab)) for ex, (pos, lab) in zip(base, saved)]
  result = _mc_label(engine, params, task, r, records, sc, seed, base)
  if cache:
    write_json(cache, [[list(map(int, ex.positions)), list(map(int, ex.labels))] for ex in result])
  return result


def _mc_label(engine, params, task, r, records, sc, seed, base):
  from restem_jax import sampling, verifiers
  vocab = engine.vocab
  by_id = {str(x["id"]): x for x in records}
  prefixes, owners = [], []
  for k, ex in enumerate(base):
    for p in ex.positions:
      prefixes.append(list(ex.prompt) + list(ex.completion[:p + 1]))
      owners.append((k, p))
  out = sampling.sample(engine.model, params, prefixes, sc, eos_id=vocab.eos_id, rng=seed,
                        batch_size=engine.batch_size, mesh=engine.mesh)
  flat = []
  for (k, p), i in zip(owners, range(len(prefixes))):
    rec = by_id[str(r.problem_ids[k // r.num_samples])]
    head = list(base[k].completion[:p + 1])
    for c in out.completions(i, vocab.eos_id):
      flat.append((rec, vocab.decode(head + c)))
  rewards, _, _ = verifiers.verify_batch(task.verifier, flat, workers=engine.workers)
  good = (rewards.reshape(len(prefixes), sc.num_samples) > 0).any(1)
  labels: dict[int, list[int]] = {}
  for (k, _), g in zip(owners, good):
    labels.setdefault(k, []).append(reward.POSITIVE if g else reward.NEGATIVE)
  result = []
  for k, ex in enumerate(base):
    lab = labels.get(k, [])
    n = reward.cut_at_first_negative(lab)
    result.append(dataclasses.replace(ex, positions=ex.positions[:n], labels=tuple(lab[:n])))
  return result



_NUMBER = re.compile(r"-?\d+")


def slip(value: int, rng: np.random.Generator) -> int:
  """A plausible arithmetic slip of `value`: off by 1, 2 or 10, or by a random 3..9,
  never negative where `value` is not."""
  delta = int(rng.choice([-10, -2, -1, 1, 2, 10, int(rng.integers(3, 10)) * int(rng.choice([-1, 1]))]))
  return value + abs(delta) if value >= 0 and value + delta < 0 else value + delta


def perturbed(r, vocab, task, records, kind: str, copies: int, seed: int) -> list[reward.Labelled]:
  """Label balance without sampling: from each right sample, `copies` wrong ones.
  A copy is the sample's text through a random step before its last (the answer
  line) with that step's last number changed by `slip`, so the first wrong step
  is the policy's own solution with one slip in it.  Labelled as samples are (the
  task's exact step labels; for an ORM, a wrong answer: it has none); a copy the
  checker still calls right is dropped.  Deterministic in `seed`."""
  if task.step_labels is None:
    raise ValueError(f"RewardConfig.perturbed: task {task.name} has no exact step labels to label "
                     "perturbed solutions with (Task.step_labels)")
  by_id = {str(x["id"]): x for x in records}
  rng = np.random.default_rng(seed)
  out = []
  for i in range(r.num_problems):
    record, prompt = by_id[str(r.problem_ids[i])], r.prompt(i)
    for j in np.nonzero(r.rewards[i] > 0)[0]:
      text = vocab.decode(r.completion(i, int(j)))
      spans = reward.step_spans(text, task.step_separator)
      for _ in range(copies if len(spans) > 1 else 0):
        a, b = spans[int(rng.integers(len(spans) - 1))]
        nums = list(_NUMBER.finditer(text, a, b))
        if not nums:
          continue
        m = nums[-1]
        cut = text[:m.start()] + str(slip(int(m.group()), rng)) + text[m.end():b]
        cut_spans = reward.step_spans(cut, task.step_separator)
        ratings = task.step_labels(cut, cut_spans, False, record)
        if ratings[-1] != -1:
          continue
        ids, offsets = vocab.encode_with_offsets(cut)
        if reward.kind_of(kind).steps:
          out.append(reward.prm_example(prompt, ids, [e for _, e in offsets], cut_spans,
                                        [reward.RATING_TO_CLASS[x] for x in ratings]))
        else:
          out.append(reward.orm_example(prompt, ids, False))
  return out


def rollout_splits(engine, policy, task, rc, rollouts_dir: str, sample_task=None, mark=None
                   ) -> tuple[dict[str, Split], dict]:
  """`policy`'s verified samples of rc's train / validation / test splits (an
  empty split name: left out), labelled for rc.kind: ({name: Split}, how often
  MC labels agree with the exact ones, per split where both exist).  MC labels
  (rc.labels = "mc") train the PRM; it is judged on exact labels where the task
  has them.  `mark(name)`: called as each split is ready (a run log's marks)."""
  out, mc_agreement = {}, {}
  for name, split, limit in (("train", rc.train_split, rc.train_limit),
                             ("validation", rc.validation_split, rc.eval_limit),
                             ("test", rc.test_split, rc.eval_limit)):
    if not split:
      continue
    r = rollouts_for(engine, policy, task, split, limit, rc.sampling, rollouts_dir, rc.seed, sample_task)
    recs = take(task.load(split), limit)
    if rc.kind == "prm" and rc.labels == "mc" and (name == "train" or task.step_labels is None):
      examples = mc_labels(engine, policy, task, r, recs,
                           dataclasses.replace(rc.sampling, num_samples=rc.mc_rollouts),
                           zlib.crc32(f"mc/{split}".encode()) + rc.seed,
                           cache=os.path.join(rollouts_dir, f"mc_labels_{split}.json"))
      if task.step_labels is not None:
        exact = reward.from_rollouts(r, engine.vocab, task, "prm", records=recs)
        same = [a == b for e, m in zip(exact, examples) for a, b in zip(e.labels, m.labels)]
        logging.info("%s: MC labels agree with the exact ones on %.1f%% of steps", name, 100 * np.mean(same))
        mc_agreement[name] = float(100 * np.mean(same)) if same else None
    else:
      examples = reward.from_rollouts(r, engine.vocab, task, rc.kind, records=recs)
    correct = (r.rewards > 0).reshape(-1)
    if name == "train" and rc.perturbed:
      extra = perturbed(r, engine.vocab, task, recs, rc.kind, rc.perturbed,
                        zlib.crc32(f"perturbed/{split}".encode()) + rc.seed)
      examples, correct = examples + extra, np.concatenate([correct, np.zeros(len(extra), bool)])
    out[name] = Split(examples, correct)
    if mark:
      mark(f"rollouts {name}")
  return out, mc_agreement


def prm800k_splits(task, vocab, rc) -> dict[str, Split]:
  """PRM800K: phase-1 train cut 95 / 5 into train and validation (rows are grouped by
  problem, so validation problems are new), and phase-1 test."""
  train_all = prm800k_examples(task, vocab, "train", rc.train_limit, rc.per_problem, rc.seed)
  cut = int(len(train_all) * 0.95)
  return {"train": Split(train_all[:cut], None), "validation": Split(train_all[cut:], None),
          "test": Split(prm800k_examples(task, vocab, "test", rc.eval_limit, rc.per_problem, rc.seed), None)}
