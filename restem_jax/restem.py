"""ReST^EM (Singh et al. 2023, Algorithm 1): self-training with a binary reward.

    base  = a given model (pretrained or checkpoint), evaluated as a row
    SFT   = the base (or a random init) fine-tuned on the human split (the paper's baseline)
    start = SFT, or the base (`start_from`): where ReST^EM starts
    for i in 1..num_iterations:
      E-step: sample `sampling.num_samples` completions per training problem from
              the current policy (with the sampling prompt, e.g. few-shot, where
              it differs from the training prompt) and verify them -> iter_i/rollouts/
      select: <= max_per_problem distinct rewarded samples per problem -> iter_i/kept.jsonl
      M-step: fine-tune the start model (or the last iterate) on their token ids,
              behind the training prompt, with the reward-weighted NLL, keeping
              the best checkpoint by validation
      evaluate: greedy pass@1 (train subset, validation, test, transfer tasks),
              pass@k and maj@k from temperature samples
    stop early when validation stops improving.

Each stage is a plain function over typed values (Rollouts, example arrays,
parameters).  Everything a stage produces lands in the run directory before
the stage counts as done, so a killed run restarted with the same command
resumes: the E-step at its first missing batch file, the M-step from its last
checkpoint, and finished evaluations are read back instead of redone.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
import sys
from typing import Callable, Sequence

import jax
import numpy as np

from restem_jax import (checkpoints, evaluation, examples, files, multihost, report, reward, rollouts, runlog,
                        training)
from restem_jax import model as model_lib
from restem_jax.files import read_json, write_json
from restem_jax.runlog import RunLog
from restem_jax.sampling import SamplingConfig


@dataclasses.dataclass(frozen=True)
class RestemConfig:
  task: str = "arith"
  train_split: str = "pool"  # problems the E-step samples (answers only)
  train_limit: int = 0  # > 0: only the first N problems of train_split
  human_split: str = "human"  # SFT data for the baseline ("" = no SFT: start from the given model)
  # where ReST^EM starts: "sft" (the SFT model; the given model when there is no human_split)
  # or "base" (the given model, hf_model_dir / base_checkpoint; SFT is then a comparison row)
  start_from: str = "sft"
  validation_split: str = "validation"
  test_split: str = "test"
  # (task, split[, limit[, max_new_tokens]]) evaluated greedily; limit > 0: the first N problems
  # (else eval_limit's), max_new_tokens > 0: its decoding limit (else eval_sampling's)
  transfer: tuple = (("arith", "test_ood"),)
  num_iterations: int = 3
  # E-step (paper: 32 samples for MATH, 64 for APPS; temperature 0.7; top-k 40; <= 10 kept).
  sampling: SamplingConfig = SamplingConfig(num_samples=32, temperature=0.7, top_k=40)
  max_per_problem: int = 10
  # the selection rule: (rollouts, max_per_problem) -> [problems, samples] bool mask of the
  # kept samples (`rollouts.select`: the first distinct correct ones; `rollouts.select_shortest`;
  # any function: `RestemConfig.select = @my_rule` after `import my_module` in the run file)
  select: Callable = rollouts.select
  # with a sampling prompt of its own (restem_main.sample_chat, e.g. few-shot): the first N
  # iterations sample with it, later ones with the training prompt, which the policy is by
  # then fine-tuned on (0: every iteration)
  sample_prompt_iterations: int = 0
  sample_batch_size: int = 64  # prompts per sampler call (and per E-step batch file)
  # M-step
  m_step_init: str = "base"  # "base" (paper) or "last" (continue from the last iterate)
  include_human_data: bool = False  # train on the human solutions too
  mstep_epochs: float = 0.0  # > 0: M-step steps = epochs * examples / batch (else TrainConfig)
  mstep_min_steps: int = 0  # with mstep_epochs: at least this many steps (small kept sets get more epochs)
  # the M-step's loss, a function of the ModelConfig returning `training.train`'s loss_fn
  # (default: the reward-weighted NLL, `training.nll_loss`); SFT keeps the NLL
  mstep_loss: Callable = training.nll_loss
  max_len: int = 128  # training sequence length (prompt + completion + EOS)
  # evaluation: pass@k / maj@k from eval_sampling's samples of each test problem; greedy
  # evaluation and validation decode up to eval_sampling.max_new_tokens too
  eval_sampling: SamplingConfig = SamplingConfig(num_samples=16, temperature=1.0)
  pass_k: tuple = (1, 4, 16)
  train_eval_size: int = 500  # training problems used for the train pass@1
  eval_limit: int = 0  # > 0: evaluate only the first N problems of each split
  patience: int = 1  # stop when validation has not improved for this many iterations
  seed: int = 0
  hf_model_dir: str = ""  # base model (Hugging Face folder); empty: random init + SFT
  base_checkpoint: str = ""  # a training folder to start from (no SFT stage)
  workers: int = 0  # verifier workers (0: one per core)
  # PRM-filtered E-step: drop answer-correct samples whose PRM score (a reward-model
  # training folder, gin/train_prm.gin) is below prm_threshold before selection
  prm_filter: str = ""
  prm_threshold: float = 0.5
  # keep only samples whose every step checks as well (tasks with a step_checker, e.g.
  # arith): exact process supervision in the E-step; evaluation still grades answers
  require_correct_steps: bool = False
  # a Hugging Face folder to write the best policy (by validation) to at the end
  # (`restem_jax.export`; needs hf_model_dir for the architecture and tokenizer)
  export_dir: str = ""

  def __post_init__(self):
    if self.start_from not in ("sft", "base"):
      raise ValueError(f"RestemConfig.start_from: {self.start_from!r}; use 'sft' or 'base'")
    if self.m_step_init not in ("base", "last"):
      raise ValueError(f"RestemConfig.m_step_init: {self.m_step_init!r}; use 'base' or 'last'")


# ----------------------------------------------------------------------------- stages


def human_examples(task, split: str, vocab, max_len: int) -> dict:
  """The split's reference solutions as a training set (reward 1)."""
  rows = task.load(split)
  return examples.policy_examples([vocab.encode(r["prompt"]) for r in rows],
                                [vocab.encode(r["solution"]) for r in rows], [1.0] * len(rows),
                                vocab.eos_id, max_len)


def check_decode_lengths(vocab, checks, fallback: Sequence[dict] = (), sample: int = 200,
                         share: float = 0.05) -> list[str]:
  """Warns where a decoding limit is shorter than the reference solutions: such
  problems can only score 0, and nothing else says so.  `checks`: (what sets the
  limit, records, max_new_tokens); records without solutions are judged by
  `fallback`'s (the task's human split: same task, same kind of solution).
  The first `sample` solutions are measured (tokens + EOS); a warning is given
  where more than `share` of them do not fit.  Returns the warnings."""
  out = []
  for what, records, limit in checks:
    sols = [r["solution"] for r in records[:sample] if r.get("solution")] or \
        [r["solution"] for r in fallback[:sample] if r.get("solution")]
    if not sols or not limit:
      continue
    lengths = np.array([len(vocab.encode(s)) + 1 for s in sols])
    if np.mean(lengths > limit) > share:
      out.append(f"{what} = {limit} is shorter than {np.mean(lengths > limit):.0%} of the reference "
                 f"solutions ({len(sols)} measured, {int(np.median(lengths))} tokens at the median, "
                 f"{int(lengths.max())} the longest): those problems can only score 0; raise it")
      logging.warning("%s", out[-1])
  return out


def prm_filter(r: rollouts.Rollouts, cfg, prm_params, task, vocab, threshold: float, max_len: int
               ) -> tuple[rollouts.Rollouts, dict]:
  """`r` with the rewards of answer-correct samples whose PRM score is below
  `threshold` set to 0 (`cfg`: the model config of the PRM's decoder)."""
  scores, _ = reward.scores(cfg, prm_params, reward.from_rollouts(r, vocab, task, "prm", labelled=False),
                            "prm", max_len=max_len)
  scores = scores.reshape(r.rewards.shape)
  drop = (r.rewards > 0) & (scores < threshold)
  stats = dict(prm_dropped=int(drop.sum()), prm_dropped_fraction_of_correct=float(
      drop.sum() / max(1, (r.rewards > 0).sum())))
  return dataclasses.replace(r, rewards=np.where(drop, 0.0, r.rewards).astype(r.rewards.dtype)), stats


def step_filter(r: rollouts.Rollouts, task, vocab, problems: list[dict]) -> tuple[rollouts.Rollouts, dict]:
  """`r` with the rewards of answer-correct samples that hold a wrong step (by the
  task's `step_checker`, given each sample's problem record) set to 0."""
  if task.step_checker is None:
    raise ValueError(f"RestemConfig.require_correct_steps: task {task.name} has no step_checker")
  texts = r.texts(vocab, task.stop)
  by_id = {str(p["id"]): p for p in problems}
  ok = np.array([[bool(c) and all(c) for c in (task.step_checker(t, by_id[pid]) for t in row)]
                 for pid, row in zip(r.problem_ids.tolist(), texts)]).reshape(r.rewards.shape)
  drop = (r.rewards > 0) & ~ok
  return dataclasses.replace(r, rewards=np.where(drop, 0.0, r.rewards).astype(r.rewards.dtype)), dict(
      step_filter_dropped=int(drop.sum()),
      step_filter_dropped_fraction_of_correct=float(drop.sum() / max(1, (r.rewards > 0).sum())))


def keep(r: rollouts.Rollouts, task, problems: list[dict], vocab, max_per_problem: int,
         path: str, select: Callable = rollouts.select) -> tuple[np.ndarray, dict]:
  """Selects the kept samples with `select(r, max_per_problem)`, writes them to `path` (JSONL:
  text and token ids), returns (mask, stats).  `problems` give the prompt text that is
  trained on (`r`'s prompts are its tokens)."""
  mask = np.asarray(select(r, max_per_problem), bool)
  if mask.shape != r.rewards.shape:
    raise ValueError(f"selection rule {getattr(select, '__name__', select)!r} returned a mask of shape "
                     f"{mask.shape}; expected [problems, samples] = {r.rewards.shape}")
  prompts = {str(p["id"]): p["prompt"] for p in problems}
  texts = r.texts(vocab, task.stop)
  kept = [dict(id=str(r.problem_ids[i]), prompt=prompts[str(r.problem_ids[i])], completion=texts[i][j],
               prompt_ids=r.prompt(i), completion_ids=r.completion(i, j), reward=float(r.rewards[i, j]))
          for i, j in zip(*np.nonzero(mask))]
  stats = dict(kept_samples=len(kept), problems_solved=int(mask.any(1).sum()),
               problems_solved_fraction=float(mask.any(1).mean()),
               estep_sample_accuracy=float((r.rewards > 0).mean()))
  if task.step_checker and kept:
    by_id = {str(p["id"]): p for p in problems}
    stats["kept_with_wrong_step"] = float(np.mean([not all(task.step_checker(k["completion"], by_id[k["id"]]))
                                                   for k in kept]))
  if multihost.is_writer():
    with files.atomic(path) as f:
      f.writelines(json.dumps(k) + "\n" for k in kept)
  return mask, stats


def m_step(engine: rollouts.Engine, tc: training.TrainConfig, data: dict, stage_dir: str,
           init_params, validate, log: RunLog, epochs: float = 0.0, min_steps: int = 0,
           loss: Callable = training.nll_loss):
  """Fine-tunes from init_params (resumable) on `loss(model config)`; epochs > 0 sets the
  step count from the data size (at least `min_steps`).  Returns (best params by
  `validate`, best score)."""
  from tqdm.auto import tqdm
  loss_fn = loss(engine.model)
  data = training.prepare(data, tc, loss_fn)  # packed rows (if the loss reads them): an epoch counts rows
  if epochs > 0:
    steps = max(int(np.ceil(epochs * len(data["weight"]) / tc.batch_size)), min_steps)
    tc = dataclasses.replace(tc, total_steps=max(steps, tc.warmup_steps + 1),
                             eval_every=max(1, min(tc.eval_every, steps // 2 or 1)))
  stage = os.path.basename(stage_dir.rstrip("/"))
  with tqdm(total=tc.total_steps, desc=f"training {stage}", unit="step", leave=False, disable=None) as bar:
    def progress(step):
      bar.n = step
      bar.refresh()
    params, score, _ = training.train(
        engine.model, tc, data, os.path.join(stage_dir, "train"), engine.mesh, loss_fn=loss_fn,
        init_params=init_params,
        validate=validate, log=lambda m: log(stage, {k: v for k, v in m.items() if k != "step"}, m["step"]),
        progress=progress)
  return params, score


def evaluate_stage(engine, params, task, splits: dict, transfer: list, cfg: RestemConfig,
                   stage_dir: str, log: RunLog, extra: dict, validation: float | None = None) -> dict:
  """The policy's metrics (evaluation.policy_metrics) plus `extra`, cached in
  stage_dir/eval.json.  `validation`: the policy's validation pass@1 where the
  M-step already measured it (it chose these parameters by it)."""
  path = os.path.join(stage_dir, "eval.json")
  if os.path.exists(path):
    return read_json(path)
  os.makedirs(stage_dir, exist_ok=True)
  m = dict(extra, **evaluation.policy_metrics(
      engine, params, task, splits, transfer, max_new_tokens=cfg.eval_sampling.max_new_tokens,
      sc=cfg.eval_sampling, ks=cfg.pass_k, seed=cfg.seed + 17,
      known={} if validation is None else {"validation": validation}))
  write_json(path, m)
  log(os.path.basename(stage_dir), {k: v for k, v in m.items() if isinstance(v, (int, float))})
  return m


def given_model(engine, cfg: RestemConfig):
  """The given model's parameters (base_checkpoint, else hf_model_dir), or None."""
  if cfg.base_checkpoint:
    return checkpoints.load_params(cfg.base_checkpoint, engine.model, engine.mesh)
  if cfg.hf_model_dir:
    from restem_jax import hf
    return hf.load_params(cfg.hf_model_dir, engine.model, engine.mesh)
  return None


def sft_policy(engine, cfg: RestemConfig, task, sft: training.TrainConfig, run_dir: str, init,
               validate, log: RunLog):
  """SFT on the human split (the paper's baseline) from `init` (None: random),
  resumable: (parameters, their validation pass@1)."""
  stage_dir = os.path.join(run_dir, "sft")
  done = os.path.join(stage_dir, "done.json")
  if os.path.exists(done):
    return (checkpoints.load_params(os.path.join(stage_dir, "train"), engine.model, engine.mesh),
            read_json(done)["validation"])
  data = human_examples(task, cfg.human_split, engine.vocab, cfg.max_len)
  params, score = m_step(engine, sft, data, stage_dir, init, validate, log)
  write_json(done, {"validation": score, "examples": len(data["weight"])})
  return params, score


def _register_kept(name: str, path: str, vocab) -> str | None:
  """The kept set's seqio Task name, where seqio is installed (the loop does not need it).
  It is registered here when the caller already works with seqio (it is imported);
  otherwise no TensorFlow is loaded for it, and `tasks.seqio_tasks.register_run(run_dir)`
  registers a run's kept sets under these names in any process."""
  if importlib.util.find_spec("seqio") is None:
    return None
  if "seqio" in sys.modules:
    from tasks import seqio_tasks
    seqio_tasks.register_kept(name, path, vocab)
  return name


# ----------------------------------------------------------------------------- the loop


def run(run_dir: str, config: RestemConfig = RestemConfig(),
        model: model_lib.ModelConfig = model_lib.ModelConfig(),
        sft: training.TrainConfig = training.TrainConfig(),
        mstep: training.TrainConfig = training.TrainConfig(),
        mesh_shape: tuple = (-1, 1, 1), vocab=None, task=None, transfer=None,
        sample_task=None) -> dict:
  """Runs (or resumes) ReST^EM in `run_dir`; returns the summary (also summary.json).

  `task` (a tasks.Task) and `transfer` ([(Task, split[, limit[, max_new_tokens]])]) default to the tasks
  named in `config`; `vocab` to the byte vocabulary of the built-in models.
  `sample_task`: the same task with the E-step's prompts (e.g. few-shot), where
  they differ from `task`'s, which are trained on and evaluated with."""
  import tasks as tasks_lib
  from restem_jax import vocab as vocab_lib
  task = task or tasks_lib.get(config.task)
  transfer = transfer if transfer is not None else [(tasks_lib.get(t), *rest) for t, *rest in config.transfer]
  with runlog.run(run_dir, mesh_shape) as (log, mesh):
    engine = rollouts.Engine(model, vocab or vocab_lib.ByteVocabulary(), mesh, config.sample_batch_size,
                             config.workers or None)
    return _loop(run_dir, config, engine, task, transfer, sft, mstep, log, sample_task)


def iteration(it: int, engine, cfg: RestemConfig, task, pool: list[dict], policy, init, human,
              mstep: training.TrainConfig, stage_dir: str, validate, log: RunLog, prm=None,
              sample_pool: list[dict] | None = None):
  """One ReST^EM iteration: E-step with `policy` on `sample_pool` (the pool's
  problems with the sampling prompts; default `pool`), PRM-filtered with `prm`,
  select, M-step from `init` on the kept completions behind `pool`'s prompts.
  Returns (the M-step's best parameters, the E-step's statistics, their
  validation pass@1, None where there was no M-step)."""
  with log.timed("e_step"):
    r = rollouts.collect(engine, policy, task, sample_pool or pool, cfg.sampling,
                         os.path.join(stage_dir, "rollouts"),
                         jax.random.fold_in(jax.random.key(cfg.seed), it))
  if sample_pool is not None:  # the PRM, the kept set and the M-step read the training prompts
    r = rollouts.with_prompts(r, pool, engine.vocab)
  kept_path = os.path.join(stage_dir, "kept.jsonl")
  filtered = {}
  if prm is not None:
    r, filtered = prm_filter(r, engine.model, prm, task, engine.vocab, cfg.prm_threshold, cfg.max_len)
  if cfg.require_correct_steps:
    r, dropped = step_filter(r, task, engine.vocab, pool)
    filtered.update(dropped)
  mask, stats = keep(r, task, pool, engine.vocab, cfg.max_per_problem, kept_path, cfg.select)
  stats.update(filtered)
  stats["seqio_task"] = _register_kept(f"{task.name}_restem_iter{it}", kept_path, engine.vocab)
  log(f"iter_{it}", stats)
  data = rollouts.examples(r, mask, engine.vocab.eos_id, cfg.max_len)
  if human is not None:
    data = {k: np.concatenate([data[k], human[k]]) for k in data}
  if not len(data["weight"]):
    logging.warning("iteration %d: no sample was kept (0 of %d problems solved): no M-step, the "
                    "policy stays as it was; sample more or start from a stronger base", it, len(pool))
    return policy, dict(stats, m_step_skipped=True), None
  with log.timed("m_step"):
    params, score = m_step(engine, mstep, data, stage_dir, init, validate, log, cfg.mstep_epochs,
                           cfg.mstep_min_steps, cfg.mstep_loss)
  return params, stats, score


def _loop(run_dir, cfg: RestemConfig, engine, task, transfer, sft, mstep, log: RunLog,
          sample_task=None) -> dict:
  limit = lambda rows: rows[:cfg.eval_limit] if cfg.eval_limit else rows  # noqa: E731
  pool = task.load(cfg.train_split)[:cfg.train_limit or None]
  sample_pool = sample_task.load(cfg.train_split)[:cfg.train_limit or None] if sample_task else None
  splits = {"train": pool[:cfg.train_eval_size], "validation": limit(task.load(cfg.validation_split)),
            "test": limit(task.load(cfg.test_split))}
  transfer = [(t, s, t.load(s)[:n[0]] if n and n[0] else limit(t.load(s)), *n[1:2]) for t, s, *n in transfer]
  eval_tokens = cfg.eval_sampling.max_new_tokens
  check_decode_lengths(engine.vocab, [
      ("RestemConfig.sampling.max_new_tokens (the E-step)", pool, cfg.sampling.max_new_tokens),
      ("RestemConfig.eval_sampling.max_new_tokens (evaluation)", splits["validation"] + splits["test"],
       eval_tokens)], task.load(cfg.human_split) if cfg.human_split else ())
  check_decode_lengths(engine.vocab, [(f"RestemConfig.transfer's max_new_tokens for {t.name}/{s}", rows,
                                       n[0] if n and n[0] else eval_tokens) for t, s, rows, *n in transfer])

  def validate(p):
    with log.timed("validation"):
      return evaluation.greedy_pass_at_1(engine, p, task, splits["validation"],
                                          cfg.eval_sampling.max_new_tokens)

  def evaluate(p, d, extra, validation=None):
    with log.timed("evaluation"):
      return evaluate_stage(engine, p, task, splits, transfer, cfg, d, log, extra, validation)
  human = human_examples(task, cfg.human_split, engine.vocab, cfg.max_len) \
      if cfg.include_human_data and cfg.human_split else None

  prm = None
  if cfg.prm_filter:
    prm = checkpoints.load_params(cfg.prm_filter, engine.model, engine.mesh, init=reward.init_params)
  given = given_model(engine, cfg)
  if given is None and not cfg.human_split:
    raise ValueError("RestemConfig: no human_split and no hf_model_dir / base_checkpoint: nothing to start from")
  if cfg.export_dir and not cfg.hf_model_dir:
    raise ValueError("RestemConfig.export_dir needs hf_model_dir (the architecture and tokenizer to export with)")
  if given is None and cfg.start_from == "base":
    raise ValueError("RestemConfig.start_from='base' needs a given model (hf_model_dir or base_checkpoint)")
  rows, start = [], None
  if given is not None:
    rows.append(dict(name="base", iteration=0, **evaluate(given, os.path.join(run_dir, "base"), {})))
    log.mark("base evaluated")
    start = given
  if cfg.human_split:
    with log.timed("sft"):
      sft_params, sft_validation = sft_policy(engine, cfg, task, sft, run_dir, given, validate, log)
    rows.append(dict(name="SFT (human data)", iteration=0,
                     **evaluate(sft_params, os.path.join(run_dir, "sft"), {}, sft_validation)))
    log.mark("SFT evaluated")
    if cfg.start_from == "sft":
      start = sft_params
  start_row = rows[-1] if start is not given else rows[0]
  start_row["start"] = True
  policy, best_val, since_best = start, start_row["validation_pass_at_1"], 0
  for it in range(1, cfg.num_iterations + 1):
    stage_dir = os.path.join(run_dir, f"iter_{it}")
    params = None
    if os.path.exists(os.path.join(stage_dir, "eval.json")):  # finished earlier: reuse
      m = read_json(os.path.join(stage_dir, "eval.json"))
    else:
      init = start if cfg.m_step_init == "base" else policy
      own = sample_pool if not cfg.sample_prompt_iterations or it <= cfg.sample_prompt_iterations else None
      params, stats, validation = iteration(it, engine, cfg, task, pool, policy, init, human, mstep, stage_dir,
                                            validate, log, prm, own)
      m = evaluate(params, stage_dir, stats, validation)
    rows.append(dict(name=f"ReST^EM iter {it}", iteration=it, **m))
    log.mark(f"iteration {it} evaluated")
    if m["validation_pass_at_1"] > best_val:
      best_val, since_best = m["validation_pass_at_1"], 0
    else:
      since_best += 1
    if params is None:  # finished earlier: its best checkpoint (or, with no M-step, the policy as was)
      params = policy if m.get("m_step_skipped") else checkpoints.load_params(
          os.path.join(stage_dir, "train"), engine.model, engine.mesh)
    policy = params
    if since_best >= cfg.patience and it < cfg.num_iterations:
      logging.info("validation has not improved for %d iteration(s): stopping", since_best)
      rows[-1]["stopped_early"] = True
      break
  summary = report.write(run_dir, rows, cfg, wall_time_s=log.wall_time(), seconds=log.seconds())
  if cfg.export_dir:
    from restem_jax import export
    best = summary["best_iteration"]
    params = policy if best == rows[-1]["iteration"] and best > 0 else \
        start if best == 0 else checkpoints.load_params(os.path.join(run_dir, f"iter_{best}", "train"),
                                                       engine.model, engine.mesh)
    summary["exported"] = export.to_hf_folder(params, engine.model, cfg.export_dir, cfg.hf_model_dir)
    write_json(os.path.join(run_dir, "summary.json"), summary)
  log.mark("done")
  return summary
