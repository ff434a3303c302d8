"""ReST^EM (Singh et al. 2023, Algorithm 1): self-training with a binary reward.

    base  = SFT on the human split (the baseline), or a given checkpoint
    for i in 1..num_iterations:
      E-step: sample num_samples completions per training problem from the
              current policy, verify them on the host, keep <= max_per_problem
              distinct correct ones per problem                -> iter_i/kept.jsonl
      M-step: fine-tune the *base* (or the last iterate) on them with the
              reward-weighted NLL, keeping the best checkpoint by validation
      Evaluate: greedy pass@1 (train subset, validation, test, transfer tasks),
              pass@k and maj@k from temperature samples
    stop early when validation stops improving.

Everything a stage produces lands in the run directory before the stage is
marked done, so a killed run restarted with the same command resumes: the
E-step from its last finished batch, the M-step from its last checkpoint, and
finished evaluations are read back instead of redone.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time

import jax
import numpy as np

from restem_jax import evaluation, partitioning, report, training, verifiers
from restem_jax import model as model_lib


@dataclasses.dataclass(frozen=True)
class RestemConfig:
  task: str = "arith"
  train_split: str = "pool"  # problems the E-step samples (answers only)
  human_split: str = "human"  # SFT data for the baseline ("" = start from the given model)
  validation_split: str = "validation"
  test_split: str = "test"
  transfer: tuple = (("arith", "test_ood"),)  # (task, split) pairs evaluated greedily
  num_iterations: int = 3
  # E-step (paper: 32 samples for MATH, 64 for APPS; temperature 0.7; top-k 40; <= 10 kept)
  num_samples: int = 32
  temperature: float = 0.7
  top_k: int = 40
  top_p: float = 1.0
  max_per_problem: int = 10
  max_new_tokens: int = 64
  sample_batch_size: int = 64  # prompts per sampler call
  # M-step
  m_step_init: str = "base"  # "base" (paper) or "last" (continue from the last iterate)
  include_human_data: bool = False  # train on the human solutions too
  mstep_epochs: float = 0.0  # > 0: M-step steps = epochs * examples / batch (else TrainConfig)
  max_len: int = 128  # training sequence length (prompt + completion + EOS)
  # evaluation
  eval_samples: int = 16  # temperature samples per test problem for pass@k / maj@k
  eval_temperature: float = 1.0
  pass_k: tuple = (1, 4, 16)
  train_eval_size: int = 500  # training problems used for the train pass@1
  eval_limit: int = 0  # > 0: evaluate only the first N problems of each split
  patience: int = 1  # stop when validation has not improved for this many iterations
  seed: int = 0
  hf_model_dir: str = ""  # base model (Hugging Face folder); empty: random init + SFT
  prompt_template: str = ""  # overrides the task's prompt ({problem}; may hold few-shot examples)
  workers: int = 0  # verifier workers (0: one per core)


def _write_json(path: str, obj) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def _read_json(path: str):
  with open(path) as f:
    return json.load(f)


class Run:
  """State shared by the stages of one run (paths, model, mesh, logging)."""

  def __init__(self, run_dir, config: RestemConfig, model, sft, mstep, mesh, vocab):
    import tasks as tasks_lib
    self.dir, self.cfg, self.model, self.sft, self.mstep = run_dir, config, model, sft, mstep
    self.mesh, self.vocab = mesh, vocab
    if config.prompt_template:
      tasks_lib.common.set_prompt(config.task, config.prompt_template)
    self.task = tasks_lib.get(config.task)
    self.transfer = [(tasks_lib.get(t), s) for t, s in config.transfer]
    self.workers = config.workers or None
    os.makedirs(run_dir, exist_ok=True)
    self.metrics_path = os.path.join(run_dir, "metrics.jsonl")
    try:
      from tensorboardX import SummaryWriter
      self.tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))
    except ImportError:
      self.tb = None
    self.t0 = time.time()
    progress_path = os.path.join(run_dir, "progress.json")
    self.elapsed_before = _read_json(progress_path)["wall_time_s"] if os.path.exists(progress_path) else 0.0

  def wall_time(self) -> float:
    return self.elapsed_before + time.time() - self.t0

  def save_progress(self, **kw):
    _write_json(os.path.join(self.dir, "progress.json"), dict(wall_time_s=self.wall_time(), **kw))

  def log(self, stage: str, metrics: dict, step: int | None = None):
    row = dict(stage=stage, time=round(self.wall_time(), 2), **({"step": step} if step is not None else {}),
               **metrics)
    with open(self.metrics_path, "a") as f:
      f.write(json.dumps(row) + "\n")
    if self.tb is not None:
      for k, v in metrics.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
          self.tb.add_scalar(f"{stage}/{k}", v, step or 0)
      self.tb.flush()

  # -------------------------------------------------------------------------- helpers

  def records(self, task, split):
    rows = task.load(split)
    return rows[:self.cfg.eval_limit] if self.cfg.eval_limit and split != self.cfg.train_split else rows

  def generate(self, params, records, *, desc, **kw):
    from tqdm.auto import tqdm
    with tqdm(total=len(records), desc=desc, unit="problem", leave=False, disable=None) as bar:
      def progress(n):
        bar.n = n
        bar.refresh()
      return evaluation.generate(self.model, params, self.vocab, records,
                                 max_new_tokens=self.cfg.max_new_tokens,
                                 batch_size=self.cfg.sample_batch_size, mesh=self.mesh,
                                 progress=progress, **kw)

  def greedy_accuracy(self, params, task, split, limit=None) -> float:
    records = self.records(task, split)[:limit]
    comps = self.generate(params, records, desc=f"greedy {task.name}/{split}", stop=task.stop)
    summary, _ = evaluation.score(task, records, comps, workers=self.workers)
    return summary["pass@1"]

  def examples(self, items) -> dict:
    """(prompt, completion, reward) -> padded token arrays; too long ones are dropped."""
    L = self.cfg.max_len
    toks, masks, rewards, dropped = [], [], [], 0
    for prompt, completion, reward in items:
      p = self.vocab.encode(prompt)
      c = self.vocab.encode(completion) + [self.vocab.eos_id]
      if len(p) + len(c) > L:
        dropped += 1
        continue
      t = np.zeros(L, np.int32)
      m = np.zeros(L, np.int32)
      t[:len(p) + len(c)] = p + c
      m[len(p):len(p) + len(c)] = 1
      toks.append(t)
      masks.append(m)
      rewards.append(reward)
    if dropped:
      logging.warning("%d examples longer than max_len=%d were dropped", dropped, L)
    if not toks:
      raise ValueError("no training examples (all dropped or none kept)")
    return dict(tokens=np.stack(toks), loss_mask=np.stack(masks),
                reward=np.asarray(rewards, np.float32))

  def train(self, stage_dir, tc, data, init_params, epochs: float = 0.0):
    """Fine-tunes from init_params; epochs > 0 sets the step count from the data size."""
    from tqdm.auto import tqdm
    if epochs > 0:
      steps = int(np.ceil(epochs * len(data["reward"]) / tc.batch_size))
      tc = dataclasses.replace(tc, total_steps=max(steps, tc.warmup_steps + 1),
                               eval_every=max(1, min(tc.eval_every, steps // 2 or 1)))
    stage = os.path.basename(stage_dir.rstrip("/"))
    with tqdm(total=tc.total_steps, desc=f"training {stage}", unit="step", leave=False, disable=None) as bar:
      def progress(step):
        bar.n = step
        bar.refresh()
      params, score, _ = training.train(
          self.model, tc, data, os.path.join(stage_dir, "train"), self.mesh, init_params=init_params,
          validate=lambda p: self.greedy_accuracy(p, self.task, self.cfg.validation_split),
          log=lambda m: self.log(stage, {k: v for k, v in m.items() if k != "step"}, m["step"]),
          progress=progress)
    return params, score

  def load_best(self, stage_dir):
    return evaluation.load_params(os.path.join(stage_dir, "train", "best"), self.model, self.mesh)

  # -------------------------------------------------------------------------- stages

  def base(self):
    """The base policy: SFT on the human split (the baseline), or the given model."""
    cfg = self.cfg
    init = None
    if cfg.hf_model_dir:
      from restem_jax import hf
      init = hf.load_params(cfg.hf_model_dir, self.model, self.mesh)
    if not cfg.human_split:
      if init is None:
        raise ValueError("RestemConfig: no human_split and no hf_model_dir: nothing to start from")
      return init
    stage_dir = os.path.join(self.dir, "sft")
    done = os.path.join(stage_dir, "done.json")
    if os.path.exists(done):
      return self.load_best(stage_dir)
    human = self.task.load(cfg.human_split)
    data = self.examples([(r["prompt"], r["solution"], 1.0) for r in human])
    params, score = self.train(stage_dir, self.sft, data, init)
    _write_json(done, {"validation": score, "examples": len(data["reward"])})
    return params

  def evaluate(self, params, stage_dir, extra: dict) -> dict:
    path = os.path.join(stage_dir, "eval.json")
    if os.path.exists(path):
      return _read_json(path)
    os.makedirs(stage_dir, exist_ok=True)
    cfg, task = self.cfg, self.task
    m = dict(extra)
    train_records = task.load(cfg.train_split)[:cfg.train_eval_size]
    comps = self.generate(params, train_records, desc="greedy train", stop=task.stop)
    m["train_pass_at_1"] = evaluation.score(task, train_records, comps, workers=self.workers)[0]["pass@1"]
    m["validation_pass_at_1"] = self.greedy_accuracy(params, task, cfg.validation_split)
    m["test_pass_at_1"] = self.greedy_accuracy(params, task, cfg.test_split)
    m["train_test_gap"] = m["train_pass_at_1"] - m["test_pass_at_1"]
    for t, split in self.transfer:
      m[f"transfer/{t.name}/{split}_pass_at_1"] = self.greedy_accuracy(params, t, split)
    if cfg.eval_samples > 1:
      records = self.records(task, cfg.test_split)
      comps = self.generate(params, records, desc="pass@k samples", num_samples=cfg.eval_samples,
                            temperature=cfg.eval_temperature, seed=cfg.seed + 17, stop=task.stop)
      summary, _ = evaluation.score(task, records, comps, ks=cfg.pass_k, workers=self.workers)
      for k in cfg.pass_k:
        for kind in ("pass", "maj"):
          if f"{kind}@{k}" in summary:  # from temperature samples (greedy pass@1 is above)
            m[f"sampled_{kind}_at_{k}"] = summary[f"{kind}@{k}"]
    _write_json(path, m)
    self.log(os.path.basename(stage_dir), {k: v for k, v in m.items() if isinstance(v, (int, float))})
    return m

  def e_step(self, it: int, policy) -> list[dict]:
    """Samples + verdicts for every training problem; resumes at the last finished batch."""
    from tqdm.auto import tqdm
    cfg, task = self.cfg, self.task
    problems = task.load(cfg.train_split)
    stage_dir = os.path.join(self.dir, f"iter_{it}")
    os.makedirs(stage_dir, exist_ok=True)
    path = os.path.join(stage_dir, "samples.jsonl")
    done_batches = []
    if os.path.exists(path):  # keep complete lines of consecutive batches; drop a torn tail
      with open(path) as f:
        for line in f:
          try:
            obj = json.loads(line)
          except json.JSONDecodeError:
            break
          if obj.get("batch") != len(done_batches):
            break
          done_batches.append(obj)
      with open(path, "w") as f:
        for obj in done_batches:
          f.write(json.dumps(obj) + "\n")
    bs = cfg.sample_batch_size
    num_batches = -(-len(problems) // bs)
    rng = jax.random.fold_in(jax.random.key(cfg.seed), it)
    with open(path, "a") as out, tqdm(total=num_batches, initial=len(done_batches),
                                      desc=f"E-step {it}", unit="batch", leave=False, disable=None) as bar:
      for b in range(len(done_batches), num_batches):
        batch = problems[b * bs:(b + 1) * bs]
        comps = evaluation.generate(
            self.model, policy, self.vocab, batch, num_samples=cfg.num_samples,
            temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
            max_new_tokens=cfg.max_new_tokens, batch_size=bs, seed=jax.random.fold_in(rng, b),
            stop=task.stop, mesh=self.mesh)
        flat = [(r, c) for r, cs in zip(batch, comps) for c in cs]
        rewards, results, _ = verifiers.verify_batch(task.verifier, flat, workers=self.workers)
        recs, i = [], 0
        for r, cs in zip(batch, comps):
          n = len(cs)
          recs.append(dict(id=r["id"], completions=cs, rewards=rewards[i:i + n].tolist(),
                           statuses=[x.status for x in results[i:i + n]]))
          i += n
        obj = {"batch": b, "records": recs}
        out.write(json.dumps(obj) + "\n")
        out.flush()
        os.fsync(out.fileno())
        done_batches.append(obj)
        bar.update(1)
    return [r for obj in done_batches for r in obj["records"]]

  def keep(self, it: int, samples: list[dict]) -> tuple[list[dict], dict]:
    """At most max_per_problem distinct correct completions per problem, in sample order."""
    problems = {r["id"]: r for r in self.task.load(self.cfg.train_split)}
    kept, solved, correct_total = [], 0, 0
    for s in samples:
      seen, mine = set(), []
      for c, rew in zip(s["completions"], s["rewards"]):
        if rew > 0:
          correct_total += 1
          if c not in seen and len(mine) < self.cfg.max_per_problem:
            seen.add(c)
            mine.append(dict(id=s["id"], prompt=problems[s["id"]]["prompt"], completion=c, reward=rew))
      solved += bool(mine)
      kept += mine
    stats = dict(kept_samples=len(kept), problems_solved=solved,
                 problems_solved_fraction=solved / max(1, len(samples)),
                 estep_sample_accuracy=correct_total / max(1, sum(len(s["completions"]) for s in samples)))
    checker = getattr(self.task, "step_checker", None)
    if checker and kept:
      stats["kept_with_wrong_step"] = float(np.mean([not all(checker(k["completion"])) for k in kept]))
    path = os.path.join(self.dir, f"iter_{it}", "kept.jsonl")
    with open(path + ".tmp", "w") as f:
      for k in kept:
        f.write(json.dumps(k) + "\n")
    os.replace(path + ".tmp", path)
    try:  # this iteration's dataset as a seqio task, e.g. "arith_restem_iter1"
      import tasks as tasks_lib
      tasks_lib.common.register_jsonl(f"{self.task.name}_restem_iter{it}", path)
      stats["seqio_task"] = f"{self.task.name}_restem_iter{it}"
    except ImportError:
      pass
    return kept, stats


def run(run_dir: str, config: RestemConfig = RestemConfig(),
        model: model_lib.ModelConfig = model_lib.ModelConfig(),
        sft: training.TrainConfig = training.TrainConfig(),
        mstep: training.TrainConfig = training.TrainConfig(),
        mesh_shape: tuple = (-1, 1, 1), vocab=None) -> dict:
  """Runs (or resumes) ReST^EM in `run_dir`; returns the summary (also summary.json)."""
  if vocab is None:
    import seqio
    vocab = seqio.ByteVocabulary()
  mesh = partitioning.make_mesh(mesh_shape)
  jax.set_mesh(mesh)
  r = Run(run_dir, config, model, sft, mstep, mesh, vocab)
  cfg = config
  base = r.base()
  rows = [dict(name="SFT (human data)" if cfg.human_split else "base", iteration=0,
               **r.evaluate(base, os.path.join(run_dir, "sft"), {}))]
  r.save_progress(stage="base evaluated")
  policy, best_val, since_best = base, rows[0]["validation_pass_at_1"], 0
  for it in range(1, cfg.num_iterations + 1):
    stage_dir = os.path.join(run_dir, f"iter_{it}")
    eval_path = os.path.join(stage_dir, "eval.json")
    if os.path.exists(eval_path):  # finished earlier: reuse
      m = _read_json(eval_path)
      params = None
    else:
      samples = r.e_step(it, policy)
      kept, stats = r.keep(it, samples)
      r.log(f"iter_{it}", stats)
      items = [(k["prompt"], k["completion"], k["reward"]) for k in kept]
      if cfg.include_human_data and cfg.human_split:
        items += [(h["prompt"], h["solution"], 1.0) for h in r.task.load(cfg.human_split)]
      init = base if cfg.m_step_init == "base" else policy
      params, val = r.train(stage_dir, mstep, r.examples(items), init, epochs=cfg.mstep_epochs)
      m = r.evaluate(params, stage_dir, stats)
    rows.append(dict(name=f"ReST^EM iter {it}", iteration=it, **m))
    r.save_progress(stage=f"iteration {it} evaluated")
    if m["validation_pass_at_1"] > best_val:
      best_val, since_best = m["validation_pass_at_1"], 0
    else:
      since_best += 1
    policy = params if params is not None else r.load_best(stage_dir)
    if since_best >= cfg.patience and it < cfg.num_iterations:
      logging.info("validation has not improved for %d iteration(s): stopping", since_best)
      rows[-1]["stopped_early"] = True
      break
  summary = report.write(run_dir, rows, cfg, wall_time_s=r.wall_time())
  r.save_progress(stage="done")
  if r.tb is not None:
    r.tb.close()
  return summary
