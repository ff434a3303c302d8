"""Reward-model runs: train an ORM or PRM; best-of-N with them against majority voting.

`train_run` (gin/train_orm.gin, gin/train_prm.gin):
  data      "rollouts": samples of a policy checkpoint on the task's train,
            validation and test splits, verified (ORM labels) and step-labelled
            where the task's steps are checkable (arith: exact PRM labels)
            -> run_dir/rollouts/<split>/batch_NNNNN.npz (resumable);
            "prm800k": PRM800K phase1_train (train / validation by problem)
            and phase1_test, human step labels.
  train     the decoder + a 3-way head (from the policy, a Hugging Face /
            GGUF model, or scratch) with `training.train`: sharded, resumable,
            keep-best on validation (PRM: first-wrong-step accuracy; ORM:
            AUROC of right against wrong answers) -> run_dir/train/checkpoints
  report    test metrics -> run_dir/summary.json

`best_of_n_run` (gin/best_of_n.gin): a pool of `sampling.num_samples` samples
per test problem from the policy, scored by the ORM and the PRM; the table of
best-of-N accuracies for N = 1, 2, 4, ... (best_of_n.csv / .png) and
summary.json.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import zlib

import jax
import numpy as np

from restem_jax import best_of_n, evaluation, files, multihost, partitioning, reward, rollouts, training
from restem_jax import model as model_lib
from restem_jax.files import read_json, write_json
from restem_jax.runlog import RunLog
from restem_jax.sampling import SamplingConfig


@dataclasses.dataclass(frozen=True)
class RewardConfig:
  """What a reward-model run trains on and how it is judged."""
  kind: str = "prm"  # "orm" | "prm"
  source: str = "rollouts"  # "rollouts" (of `policy`) | "prm800k"
  policy: str = ""  # training folder, Hugging Face folder or .gguf the samples come from
  init: str = "policy"  # "policy" | "scratch" | a checkpoint / HF folder / .gguf
  train_split: str = "pool"
  validation_split: str = "validation"
  test_split: str = "test"
  train_limit: int = 0  # problems (0: all)
  eval_limit: int = 0
  # PRM800K: problems drawn at random (with `seed`) when limited, and at most this
  # many of each problem's rated solutions, also at random (0: all of them)
  per_problem: int = 0
  sampling: SamplingConfig = SamplingConfig(num_samples=8, temperature=1.0, max_new_tokens=48)
  sample_batch_size: int = 64
  max_len: int = 128
  reduction: str = "product"  # PRM score: "product" | "min" of P(step correct)
  neutral_is_correct: bool = True
  seed: int = 0
  workers: int | None = None
  # active learning: score `active_samples` more samples per train problem, add the
  # `active_per_problem` convincing wrong answers of each to the data, retrain; the
  # same number of uniformly drawn samples is the control
  active_samples: int = 0
  active_per_problem: int = 2
  # PRM step labels of sampled solutions: "exact" (the task's checker) or "mc"
  # (Math-Shepherd: `mc_rollouts` completions from each step's prefix; for training,
  # while validation and test keep exact labels where the task has them)
  labels: str = "exact"
  mc_rollouts: int = 4

  def __post_init__(self):
    if self.kind not in reward.KINDS:
      raise ValueError(f"RewardConfig.kind: {self.kind!r} is not one of {reward.KINDS}")
    if self.source not in ("rollouts", "prm800k"):
      raise ValueError(f"RewardConfig.source: {self.source!r} is not 'rollouts' or 'prm800k'")
    if self.labels not in ("exact", "mc"):
      raise ValueError(f"RewardConfig.labels: {self.labels!r} is not 'exact' or 'mc'")
    if self.active_samples and not self.test_split:
      raise ValueError("RewardConfig.active_samples: active learning is judged on test_split; give one")
    if self.source == "prm800k" and self.kind != "prm":
      raise ValueError("RewardConfig: PRM800K has step labels only: kind must be 'prm'")


def _limit(records, n):
  return records[:n] if n else records


def rollouts_for(engine, params, task, split: str, limit: int, sc: SamplingConfig, out_dir: str, seed: int,
                 sample_task=None):
  """Verified samples of `split`'s first `limit` problems (resumable, in
  out_dir/split).  With `sample_task` (the same task with other prompts, e.g.
  few-shot) the policy samples behind its prompts, and the rollouts come back
  behind `task`'s: what a reward model reads."""
  recs = _limit(task.load(split), limit)
  r = rollouts.collect(engine, params, sample_task or task, _limit((sample_task or task).load(split), limit), sc,
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


def step_metrics(per_step: list[np.ndarray], examples: list[reward.Labelled]) -> dict:
  """PRM: accuracy of locating the first wrong step (or none) on solutions with
  every step labelled, and step-level accuracy of P(NEGATIVE) > 0.5."""
  located, n_sol, right, n_steps, clean, cut = 0, 0, 0, 0, 0, 0
  p_neg, is_neg = [], []
  for probs, ex in zip(per_step, examples):
    labels = np.asarray(ex.labels)
    if len(probs) < len(labels):  # steps past max_len: the first wrong one may be among them
      cut += 1
      continue
    if len(labels) == 0 or (labels < 0).any():
      continue
    truth = int(np.argmax(labels == reward.NEGATIVE)) if (labels == reward.NEGATIVE).any() else -1
    located += reward.first_wrong_step(probs) == truth
    clean += truth == -1
    n_sol += 1
    right += int(((probs[:, reward.NEGATIVE] > 0.5) == (labels == reward.NEGATIVE)).sum())
    n_steps += len(labels)
    p_neg.extend(probs[:len(labels), reward.NEGATIVE])
    is_neg.extend(labels == reward.NEGATIVE)
  return {"first_wrong_step_accuracy": 100.0 * located / max(n_sol, 1), "solutions": n_sol,
          "always_none_baseline": 100.0 * clean / max(n_sol, 1),  # answering "no wrong step"
          "truncated_solutions": cut,
          # does P(NEGATIVE) rank the wrong steps above the others (0.5: no better than chance)
          "negative_step_auroc": auroc(np.asarray(p_neg), np.asarray(is_neg, bool)),
          "step_accuracy": 100.0 * right / max(n_steps, 1)}


def auroc(s: np.ndarray, positive: np.ndarray) -> float:
  """Mann-Whitney U / (pos * neg), ties counted half; nan without both classes."""
  from scipy.stats import rankdata
  positive = np.asarray(positive, bool)
  pos, neg = int(positive.sum()), int((~positive).sum())
  if not pos or not neg:
    return float("nan")
  return float((rankdata(s)[positive].sum() - pos * (pos + 1) / 2) / (pos * neg))


def outcome_metrics(s: np.ndarray, correct: np.ndarray) -> dict:
  """Solution level: accuracy of score > 0.5 against the verifier, and AUROC."""
  correct = np.asarray(correct, bool)
  return {"solution_accuracy": 100.0 * float(np.mean((s > 0.5) == correct)), "auroc": auroc(s, correct)}


def evaluate_rm(cfg, params, examples, kind, rc: RewardConfig, correct=None) -> dict:
  s, per = reward.scores(cfg, params, examples, kind, max_len=rc.max_len, reduction=rc.reduction,
                         neutral_is_correct=rc.neutral_is_correct)
  m = step_metrics(per, examples) if kind == "prm" else {}
  if correct is not None:
    m.update(outcome_metrics(s, correct))
  return m


def _engine(model, vocab, mesh, rc):
  return rollouts.Engine(model, vocab, mesh, rc.sample_batch_size, rc.workers)


def train_run(run_dir: str, rc: RewardConfig, model: model_lib.ModelConfig, tc: training.TrainConfig,
              vocab, task, mesh_shape=(-1, 1, 1), sample_task=None, rollouts_dir: str = "") -> dict:
  """Trains a reward model in run_dir (resumable); returns the summary.
  `sample_task`: the policy samples behind its prompts (see `rollouts_for`);
  `rollouts_dir` (default run_dir/rollouts): where the samples are kept, one
  folder for an ORM and a PRM trained on the same samples.  An empty
  `rc.test_split` skips the test metrics (best-of-N measures on its own pool)."""
  rollouts_dir = rollouts_dir or os.path.join(run_dir, "rollouts")
  mesh = partitioning.make_mesh(tuple(mesh_shape))
  with contextlib.closing(RunLog(run_dir)) as log, jax.set_mesh(mesh):  # the log closes on any exit
    policy = None
    if rc.source == "rollouts":
      if not rc.policy:
        raise ValueError("RewardConfig.policy: a checkpoint to sample from is needed (source 'rollouts')")
      policy = evaluation.load_params(rc.policy, model, mesh)
      engine = _engine(model, vocab, mesh, rc)
      outs, mc_agreement = {}, {}
      for name, split, limit in (("train", rc.train_split, rc.train_limit),
                                 ("validation", rc.validation_split, rc.eval_limit),
                                 ("test", rc.test_split, rc.eval_limit)):
        if not split:
          continue
        r = rollouts_for(engine, policy, task, split, limit, rc.sampling, rollouts_dir, rc.seed, sample_task)
        recs = _limit(task.load(split), limit)
        # MC labels train the PRM; it is judged on exact labels where the task has them
        if rc.kind == "prm" and rc.labels == "mc" and (name == "train" or task.step_labels is None):
          examples = mc_labels(engine, policy, task, r, recs,
                               dataclasses.replace(rc.sampling, num_samples=rc.mc_rollouts),
                               zlib.crc32(f"mc/{split}".encode()) + rc.seed,
                               cache=os.path.join(rollouts_dir, f"mc_labels_{split}.json"))
          if task.step_labels is not None:  # how often MC agrees with the exact labels
            exact = reward.from_rollouts(r, vocab, task, "prm", records=recs)
            same = [a == b for e, m in zip(exact, examples)
                    for a, b in zip(e.labels, m.labels)]
            logging.info("%s: MC labels agree with the exact ones on %.1f%% of steps", name,
                         100 * np.mean(same))
            log.mark(f"mc {name}")
            mc_agreement[name] = float(100 * np.mean(same)) if same else None
        else:
          examples = reward.from_rollouts(r, vocab, task, rc.kind, records=recs)
        outs[name] = (examples, (r.rewards > 0).reshape(-1))
        log.mark(f"rollouts {name}")
    else:
      train_all = prm800k_examples(task, vocab, "train", rc.train_limit, rc.per_problem, rc.seed)
      cut = int(len(train_all) * 0.95)  # rows are grouped by problem: validation problems are new
      outs = {"train": (train_all[:cut], None), "validation": (train_all[cut:], None),
              "test": (prm800k_examples(task, vocab, "test", rc.eval_limit, rc.per_problem, rc.seed),
                       None)}
    data = reward.pack(outs["train"][0], rc.max_len)
    stats = {f"{k}_solutions": len(v[0]) for k, v in outs.items()}
    if rc.source == "rollouts" and mc_agreement:
      stats["mc_agreement_with_exact"] = mc_agreement
    stats["train_labels"] = int(data["label_mask"].sum())
    stats["train_negative_share"] = float((data["labels"][data["label_mask"] > 0] == reward.NEGATIVE).mean())
    log("data", stats)
    logging.info("reward model data: %s", stats)

    val_examples, val_correct = outs["validation"]
    # keep-best: the PRM by locating first wrong steps; the ORM by how it ranks right
    # answers above wrong ones (AUROC, x100), which is what picking among samples needs:
    # its accuracy at 0.5 rewards answering "wrong" when most samples are (the base
    # model's are 96% wrong); accuracy only where validation lacks a class
    both = val_correct is not None and 0 < np.mean(val_correct) < 1

    def validate(params):
      m = evaluate_rm(model, params, val_examples, rc.kind, rc, val_correct)
      if rc.kind == "prm":
        return m["first_wrong_step_accuracy"]
      return 100 * m["auroc"] if both else m["solution_accuracy"]

    init_params = None
    if rc.init == "policy":
      if policy is None:
        raise ValueError("RewardConfig.init 'policy' needs source 'rollouts'; give a model path")
      init_params = reward.from_decoder(model, policy)
    elif rc.init != "scratch":
      init_params = reward.from_decoder(model, evaluation.load_params(rc.init, model, mesh))
    best, score, _ = training.train(
        model, tc, data, os.path.join(run_dir, "train"), mesh, loss_fn=reward.loss(model),
        init_fn=functools.partial(reward.init_params, model), init_params=init_params,
        validate=validate,
        log=lambda m: log(f"train_{rc.kind}", {k: v for k, v in m.items() if k != "step"}, m["step"]))
    test = evaluate_rm(model, best, outs["test"][0], rc.kind, rc, outs["test"][1]) if "test" in outs else {}
    summary = dict(kind=rc.kind, source=rc.source, validation=score, data=stats,
                   test={k: round(v, 3) if isinstance(v, float) else v for k, v in test.items()})
    if rc.active_samples:
      summary["active_learning"] = active_learning(
          run_dir, rc, model, tc, vocab, task, _engine(model, vocab, mesh, rc), policy, best, outs,
          init_params, validate, mesh, log, sample_task)
    summary["wall_time_s"] = round(log.wall_time(), 1)
    write_json(os.path.join(run_dir, "summary.json"), summary)
    log("test", summary["test"])
    log.mark("done")
    return summary


def active_learning(run_dir, rc: RewardConfig, model, tc, vocab, task, engine, policy, rm, outs,
                    init_params, validate, mesh, log, sample_task=None) -> dict:
  """Retrains with the convincing wrong answers of a fresh pool (scored by `rm`)
  and, as the control, with as many uniformly drawn samples; test metrics of both."""
  if policy is None:
    raise ValueError("RewardConfig.active_samples needs source 'rollouts' (a policy to sample)")
  sc = dataclasses.replace(rc.sampling, num_samples=rc.active_samples)
  pool = rollouts_for(engine, policy, task, rc.train_split, rc.train_limit, sc,
                      os.path.join(run_dir, "active_pool"), rc.seed + 1, sample_task)
  correct = pool.rewards > 0
  s, _ = reward.scores(model, rm, reward.from_rollouts(pool, vocab, task, rc.kind, labelled=False),
                       rc.kind, max_len=rc.max_len, reduction=rc.reduction,
                       neutral_is_correct=rc.neutral_is_correct)
  picked = reward.convincing_wrong(s.reshape(correct.shape), correct, rc.active_per_problem).reshape(-1)
  n = int(picked.sum())
  control = np.zeros(picked.shape, bool)
  control[np.random.default_rng(rc.seed).choice(picked.size, n, replace=False)] = True
  labelled = reward.from_rollouts(pool, vocab, task, rc.kind,
                                  records=_limit(task.load(rc.train_split), rc.train_limit))
  out = {"pool_samples": int(picked.size), "selected": n,
         "selected_mean_score": float(s[picked].mean()) if n else None,
         "wrong_answer_share_of_pool": float(1 - correct.mean())}
  for name, mask in (("convincing_wrong", picked), ("random", control)):
    extra = [ex for ex, m in zip(labelled, mask) if m]
    data = reward.pack(list(outs["train"][0]) + extra, rc.max_len)
    params, score, _ = training.train(
        model, tc, data, os.path.join(run_dir, f"train_{name}"), mesh, loss_fn=reward.loss(model),
        init_fn=functools.partial(reward.init_params, model), init_params=init_params, validate=validate,
        log=lambda m, name=name: log(f"train_{name}", {k: v for k, v in m.items() if k != "step"}, m["step"]))
    test = evaluate_rm(model, params, outs["test"][0], rc.kind, rc, outs["test"][1])
    out[name] = dict(validation=score, test={k: round(v, 3) if isinstance(v, float) else v
                                             for k, v in test.items()})
    log(f"active_{name}", out[name]["test"])
  return out


def load_rm(path: str, model):
  return evaluation.load_params(path, model, init=reward.init_params)


def best_of_n_run(run_dir: str, policy: str, orm: str, prm: str, model: model_lib.ModelConfig, vocab,
                  task, split: str = "test", limit: int = 0,
                  sampling: SamplingConfig = SamplingConfig(num_samples=16, temperature=1.0, max_new_tokens=48),
                  num_subsets: int = 200, rc: RewardConfig = RewardConfig(), mesh_shape=(-1, 1, 1),
                  sample_task=None) -> dict:
  """Best-of-N on a pool of samples per problem: pass@N, majority, and each
  given reward model's pick and weighted vote (table, PNG, summary.json).
  The reward models read the samples behind `task`'s prompts (the policy
  samples behind `sample_task`'s, where given).  Where the task's steps are
  checkable, the PRM's first-wrong-step accuracy on the pool is reported too
  (`first_wrong_step`: held-out problems, every sample)."""
  mesh = partitioning.make_mesh(tuple(mesh_shape))
  with contextlib.closing(RunLog(run_dir)) as log, jax.set_mesh(mesh):  # the log closes on any exit
    params = evaluation.load_params(policy, model, mesh)
    r = rollouts_for(_engine(model, vocab, mesh, rc), params, task, split, limit, sampling,
                     os.path.join(run_dir, "rollouts"), rc.seed, sample_task)
    log.mark("pool")
    correct = r.rewards > 0
    answers = [[a if a else None for a in row] for row in r.answers.tolist()]
    scores, rm_metrics = {}, {}
    cache = os.path.join(run_dir, "scores.npz")
    saved = dict(np.load(cache)) if os.path.exists(cache) else {}
    steps_path = os.path.join(run_dir, "first_wrong_step.json")
    steps = read_json(steps_path) if os.path.exists(steps_path) else None
    for name, path in (("ORM", orm), ("PRM", prm)):
      if not path:
        continue
      kind = name.lower()
      if name not in saved:
        examples = reward.from_rollouts(r, vocab, task, kind, labelled=False)
        s, per = reward.scores(model, load_rm(path, model), examples, kind, max_len=rc.max_len,
                               reduction=rc.reduction, neutral_is_correct=rc.neutral_is_correct)
        saved[name] = s.reshape(correct.shape)
        if kind == "prm" and task.step_labels is not None:  # exact labels: judge the steps too
          labelled = reward.from_rollouts(r, vocab, task, "prm", records=_limit(task.load(split), limit))
          steps = step_metrics([p[:len(ex.labels)] for p, ex in zip(per, labelled)], labelled)
          if multihost.is_writer():
            write_json(steps_path, steps)
        if multihost.is_writer():
          with files.atomic(cache, "wb") as f:
            np.savez(f, **saved)
      scores[name] = saved[name]
      rm_metrics[name] = outcome_metrics(scores[name].reshape(-1), correct.reshape(-1))
    df = best_of_n.table(correct, answers, scores, num_subsets=num_subsets, seed=rc.seed)
    if multihost.is_writer():
      df.round(2).to_csv(os.path.join(run_dir, "best_of_n.csv"))
      best_of_n.plot(df, os.path.join(run_dir, "best_of_n.png"),
                     f"{task.name}/{split}: {r.num_problems} problems, pool of {r.num_samples}")
    print(df.round(1).to_string())
    cols = {"pass@N": "pass_at_n", "majority": "majority", "ORM": "orm", "PRM": "prm",
            "ORM-weighted": "orm_weighted", "PRM-weighted": "prm_weighted"}
    table = {"N": [int(n) for n in df.index]}
    table.update({key: [round(float(v), 2) for v in df[col]] for col, key in cols.items() if col in df})
    summary = dict(problems=r.num_problems, pool=r.num_samples, best_of_n=table,
                   reward_models=rm_metrics, wall_time_s=round(log.wall_time(), 1))
    if steps is not None and prm:
      summary["first_wrong_step"] = {k: steps[k] for k in ("first_wrong_step_accuracy", "solutions",
                                                           "always_none_baseline", "negative_step_auroc",
                                                           "truncated_solutions")}
    write_json(os.path.join(run_dir, "summary.json"), summary)
    log.mark("done")
    return summary
