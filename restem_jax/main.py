"""Entry point: python -m restem_jax.main --gin_file=gin/restem_arith.gin [--gin.NAME=VALUE ...]

Flags: --gin_file (repeatable), --gin_bindings (repeatable), --gin.NAME=VALUE
(e.g. --gin.RUN_DIR="'/tmp/run1'"); with several processes (hosts)
--coordinator_address=HOST:PORT --num_processes=N --process_id=I (Cloud TPU
VMs and SLURM need none: JAX finds them; scripts/local_multihost.sh starts N
local processes).  The gin file chooses what runs
(`execute.fn`): ReST^EM (`restem_main`), evaluation only (`eval_main`), a
reward model (`reward_main`) or best-of-N selection (`best_of_n_main`).
The operative config is saved in the run directory.
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys
from typing import NamedTuple

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def parse_flags(argv):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--gin_file", action="append", default=[], help="gin file (repeatable)")
  ap.add_argument("--gin_bindings", action="append", default=[], help="gin binding (repeatable)")
  ap.add_argument("--gin_search_path", action="append", default=[], help="folder to find gin files in")
  mh = ap.add_argument_group("several processes (hosts); Cloud TPU VMs and SLURM need none of these")
  mh.add_argument("--coordinator_address", default="", help="HOST:PORT of process 0")
  mh.add_argument("--num_processes", type=int, default=0, help="processes in the run")
  mh.add_argument("--process_id", type=int, default=-1, help="this process (0 .. num_processes-1)")
  args, rest = ap.parse_known_args(argv)
  bindings = list(args.gin_bindings)
  for a in rest:
    if a.startswith("--gin.") and "=" in a:
      bindings.append(a[len("--gin."):])
    else:
      ap.error(f"unrecognised argument {a!r} (use --gin.NAME=VALUE for gin bindings)")
  if not args.gin_file:
    ap.error("give at least one --gin_file (e.g. gin/restem_arith.gin)")
  return args, bindings


def _setup(model, hf_model_dir):
  """The architecture and vocabulary: a Hugging Face folder's, or the built-in byte model's."""
  from restem_jax import hf, vocab
  if not hf_model_dir:
    return model, vocab.ByteVocabulary()
  model = hf.load_config(hf_model_dir, dtype=model.dtype, remat=model.remat, param_dtype=model.param_dtype)
  return model, vocab.HFTokenizerVocabulary(hf_model_dir)


def _task(name, data_dir, task_options, prompt="", chat=None, vocab=None, allow_unisolated=False):
  """The task `name` as configured: data folder, options, prompt template, and
  (with a ChatFormat) prompts rendered by the tokenizer's chat template.  A task
  whose verifier runs model-written code checks the sandbox here, before any
  sampling: without bubblewrap it refuses unless `allow_unisolated`."""
  import dataclasses
  import tasks
  options = dict(task_options or {})
  if options and name not in options and getattr(tasks.TASKS.get(name), "configure", None):
    logging.warning("task %s takes options, but task_options gives them only for %s: %s runs with its "
                    "defaults (a run file copied from another task?)", name, sorted(options), name)
  task = tasks.get(name, data_dir=data_dir, options=options.get(name), prompt=prompt)
  if hasattr(task.verifier, "allow_unisolated"):
    from restem_jax.verifiers import sandbox
    sandbox.require_isolation(allow_unisolated)
    task = dataclasses.replace(task, verifier=dataclasses.replace(task.verifier, allow_unisolated=allow_unisolated))
  return tasks.chat(task, vocab, chat) if chat is not None else task


def _sample_task(name, data_dir, task_options, prompt, chat, sample_prompt, sample_chat, vocab,
                 allow_unisolated):
  """The task behind the policy's sampling prompts (`sample_prompt` / `sample_chat`,
  each defaulting to the main one), or None where there are none of its own."""
  if sample_chat is None and not sample_prompt:
    return None
  return _task(name, data_dir, task_options, sample_prompt or prompt, sample_chat or chat, vocab,
               allow_unisolated)


class Setup(NamedTuple):
  """What every entry point resolves first from its gin values."""
  model: object  # ModelConfig: the Hugging Face model's architecture where there is one
  vocab: object
  task: object  # the task as configured: data folder, options, prompt, chat format
  sample_task: object  # the same task behind the policy's sampling prompts, or None
  data_dir: str  # absolute


def resolve(model, hf_model_dir, task, data_dir="", task_options=None, prompt="", chat=None,
            allow_unisolated_code=False, sample_prompt="", sample_chat=None) -> Setup:
  """The entry points' shared values (`hf_model_dir`, `data_dir`: absolute or '')."""
  from restem_jax.files import absolute
  data_dir = absolute(data_dir)
  model, vocab = _setup(model, absolute(hf_model_dir))
  return Setup(model, vocab, _task(task, data_dir, task_options, prompt, chat, vocab, allow_unisolated_code),
               _sample_task(task, data_dir, task_options, prompt, chat, sample_prompt, sample_chat, vocab,
                            allow_unisolated_code), data_dir)


def restem_main(run_dir, config, model, sft, mstep, mesh_shape=(-1, 1, 1), data_dir="",
                task_options=None, prompt="", chat=None, allow_unisolated_code=False,
                sample_chat=None, sample_prompt=""):
  """ReST^EM in run_dir.  `task_options`: {task name: its options} (arith: an
  ArithConfig; apps: difficulties); `prompt` replaces the main task's template;
  `chat` (a ChatFormat) renders every task's prompts with the chat template;
  `allow_unisolated_code` lets code tasks run programs without bubblewrap
  (rlimits only; by default they refuse to start).  The other entry points
  take these four the same way.  `sample_chat` / `sample_prompt`: the E-step's
  own prompts (e.g. few-shot) where they differ; training and evaluation use
  `chat` / `prompt`."""
  import dataclasses
  from restem_jax import restem
  from restem_jax.files import absolute
  config = dataclasses.replace(config, hf_model_dir=absolute(config.hf_model_dir),
                               prm_filter=absolute(config.prm_filter), export_dir=absolute(config.export_dir))
  s = resolve(model, config.hf_model_dir, config.task, data_dir, task_options, prompt, chat,
              allow_unisolated_code, sample_prompt, sample_chat)
  transfer = [(_task(t, s.data_dir, task_options, chat=chat, vocab=s.vocab, allow_unisolated=allow_unisolated_code),
               *rest) for t, *rest in config.transfer]
  return restem.run(absolute(run_dir), config, s.model, sft, mstep, tuple(mesh_shape), vocab=s.vocab, task=s.task,
                    transfer=transfer, sample_task=s.sample_task)


def run_values(run_dir: str) -> dict:
  """What a ReST^EM run was configured with, read back from its config.gin: `model`
  (a ModelConfig; a Hugging Face model's where it had one), `vocab`, `task` (the
  main task with its data folder, options, prompt and chat format), `config` (its
  RestemConfig).  For notebooks and scripts that look at a run; clears gin's bindings."""
  import gin
  path = os.path.join(run_dir, "config.gin")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: not found (is {run_dir} a ReST^EM run folder?)")
  register_configurables()
  with gin.unlock_config():
    gin.clear_config()
    gin.parse_config_file(path)
    b = gin.get_bindings("restem_main")
    gin.clear_config()
  config = b["config"]
  s = resolve(b["model"], config.hf_model_dir, config.task, b.get("data_dir", ""), b.get("task_options"),
              b.get("prompt", ""), b.get("chat"), b.get("allow_unisolated_code", False))
  return dict(model=s.model, vocab=s.vocab, task=s.task, config=config)


def eval_main(checkpoint, model, task="arith", split="test", sampling=None, ks=(1,), batch_size=64,
              limit=0, out="", data_dir="", task_options=None, hf_model_dir="", prompt="", chat=None,
              allow_unisolated_code=False):
  """Evaluates `checkpoint` (a training folder, or hf_model_dir itself when empty):
  greedy pass@1, and pass@k / maj@k of `sampling`'s samples."""
  from restem_jax import evaluation
  from restem_jax.files import absolute
  from restem_jax.sampling import SamplingConfig
  checkpoint, out, hf_model_dir = map(absolute, (checkpoint, out, hf_model_dir))
  s = resolve(model, hf_model_dir, task, data_dir, task_options, prompt, chat, allow_unisolated_code)
  df = evaluation.evaluate(checkpoint or hf_model_dir, s.task,
                           model=s.model, split=split, vocab=s.vocab, sc=sampling or SamplingConfig(),
                           ks=tuple(ks), batch_size=batch_size, limit=limit or None)
  summary = df.attrs["summary"]
  print(json.dumps(summary, indent=1))
  from restem_jax import multihost
  if out and multihost.is_writer():
    os.makedirs(out, exist_ok=True)
    df.to_json(os.path.join(out, f"{task}_{split}.jsonl"), orient="records", lines=True)
    with open(os.path.join(out, f"{task}_{split}_summary.json"), "w") as f:
      json.dump(summary, f, indent=1)
  return summary


def reward_main(run_dir, config, model, train, task="arith", mesh_shape=(-1, 1, 1), data_dir="",
                task_options=None, hf_model_dir="", prompt="", chat=None, allow_unisolated_code=False,
                sample_chat=None, sample_prompt=""):
  """Trains an ORM or PRM (`config`, a RewardConfig) in run_dir.  The policy samples
  behind `sample_chat` / `sample_prompt` where given (e.g. few-shot); the reward
  model reads the samples behind `chat` / `prompt`."""
  import dataclasses
  from restem_jax import reward_run
  from restem_jax.files import absolute
  config = dataclasses.replace(config, policy=absolute(config.policy),
                               init=config.init if config.init in ("policy", "scratch") else absolute(config.init))
  s = resolve(model, hf_model_dir, task, data_dir, task_options, prompt, chat, allow_unisolated_code,
              sample_prompt, sample_chat)
  summary = reward_run.train_run(absolute(run_dir), config, s.model, train, s.vocab, s.task, tuple(mesh_shape),
                                 s.sample_task)
  print(json.dumps(summary, indent=1))
  return summary


def best_of_n_main(run_dir, policy, model, orm="", prm="", task="arith", split="test", limit=0,
                   sampling=None, num_subsets=200, config=None, reward_train=None, filter_restem=None,
                   filter_mstep=None, mesh_shape=(-1, 1, 1), data_dir="", task_options=None,
                   hf_model_dir="", prompt="", chat=None, allow_unisolated_code=False,
                   sample_chat=None, sample_prompt=""):
  """Best-of-N of `policy`'s samples (`hf_model_dir` itself when empty): pass@N,
  majority, ORM / PRM picks and weighted votes.  An empty `orm` / `prm` is trained
  here first (run_dir/orm, run_dir/prm, with `config` and `reward_train`, on the
  same samples, run_dir/rm_rollouts); with `filter_restem` (a RestemConfig) one
  ReST^EM run from `policy` without and one with the PRM filter are compared.
  `sample_chat` / `sample_prompt`: the policy samples behind these prompts (e.g.
  few-shot); the reward models read the samples behind `chat` / `prompt`."""
  from restem_jax import best_of_n_study
  from restem_jax.files import absolute
  run_dir, policy, orm, prm, hf_model_dir = map(absolute, (run_dir, policy, orm, prm, hf_model_dir))
  s = resolve(model, hf_model_dir, task, data_dir, task_options, prompt, chat, allow_unisolated_code,
              sample_prompt, sample_chat)
  return best_of_n_study.run(
      run_dir, policy, orm, prm, s.model, s.vocab, s.task, split=split, limit=limit, sampling=sampling,
      num_subsets=num_subsets, config=config, reward_train=reward_train, filter_restem=filter_restem,
      filter_mstep=filter_mstep, mesh_shape=tuple(mesh_shape), sample_task=s.sample_task,
      hf_model_dir=hf_model_dir)


def execute(fn):
  return fn()


@functools.lru_cache(maxsize=1)
def register_configurables():
  """Registers the configurable dataclasses and entry points (once per process)."""
  import dataclasses

  import gin

  import tasks
  from restem_jax import gguf, model, restem, rollouts, sampling, training
  from tasks import common
  gin.external_configurable(gguf.smollm2_path, "smollm2_path")
  gin.external_configurable(common.ChatFormat, "ChatFormat")
  gin.external_configurable(model.ModelConfig, "ModelConfig")
  gin.external_configurable(sampling.SamplingConfig, "SamplingConfig")
  gin.external_configurable(training.TrainConfig, "TrainConfig")
  gin.external_configurable(restem.RestemConfig, "RestemConfig")
  for task in tasks.TASKS.values():  # every registered task's options type (arith: ArithConfig)
    if dataclasses.is_dataclass(task.options):
      gin.external_configurable(type(task.options), type(task.options).__name__)
  gin.external_configurable(rollouts.select, "select_first")
  gin.external_configurable(rollouts.select_shortest, "select_shortest")
  gin.external_configurable(training.nll_loss, "nll_loss")
  gin.external_configurable(restem_main, "restem_main")
  gin.external_configurable(eval_main, "eval_main")
  from restem_jax import reward_run
  gin.external_configurable(reward_run.RewardConfig, "RewardConfig")
  gin.external_configurable(reward_main, "reward_main")
  gin.external_configurable(best_of_n_main, "best_of_n_main")
  return gin.external_configurable(execute, "execute")


def main(argv=None):
  args, bindings = parse_flags(sys.argv[1:] if argv is None else argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.WARNING)  # orbax is chatty
  from restem_jax import multihost
  multihost.initialize(args.coordinator_address, args.num_processes, args.process_id)
  import gin
  run = register_configurables()
  for p in args.gin_search_path + [os.getcwd(), os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))]:
    gin.add_config_file_search_path(p)
  gin.parse_config_files_and_bindings(args.gin_file, bindings)
  try:
    run_dir = gin.query_parameter("%RUN_DIR")
  except (ValueError, KeyError):
    run_dir = None
  writer = run_dir and multihost.is_writer()
  if writer:
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "config.gin"), "w") as f:
      f.write(gin.config_str())
  result = run()
  if writer:
    with open(os.path.join(run_dir, "operative_config.gin"), "w") as f:
      f.write(gin.operative_config_str())
  multihost.barrier("main done")  # process 0 hosts the coordinator: it leaves last
  return result


if __name__ == "__main__":
  main()
