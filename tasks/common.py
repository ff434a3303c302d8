"""What every task module shares: where data lives, checked JSONL reading,
prompt templates, and seqio registration of host-side records."""
from __future__ import annotations

import dataclasses
import gzip
import json
import os
from typing import Callable

DEFAULT_DATA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "..", "shared", "data")
_data_dir = None


_prompts: dict[str, str] = {}


def set_prompt(task: str, template: str | None) -> None:
  """Overrides a task's prompt template ({problem} is filled in; few-shot
  examples can be written into the template).  None restores the default."""
  if template:
    _prompts[task] = template
  else:
    _prompts.pop(task, None)


def template(task: str, default: str) -> str:
  """The prompt template in force for `task` (pass it into cached loaders)."""
  return _prompts.get(task, default)


def set_data_dir(path: str | None) -> None:
  """Where MATH / GSM8K / APPS / HumanEval folders live (else $RESTEM_DATA_DIR,
  else ../shared/data beside the project)."""
  global _data_dir
  _data_dir = path


def data_dir() -> str:
  return _data_dir or os.environ.get("RESTEM_DATA_DIR") or DEFAULT_DATA_DIR


def data_path(*parts: str) -> str:
  path = os.path.join(data_dir(), *parts)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: data file not found (set RESTEM_DATA_DIR or the DATA_DIR "
                            "gin macro to the folder holding math/, gsm8k/, apps/, humaneval/)")
  return path


def read_jsonl(path: str, required: dict[str, type | tuple]) -> list[dict]:
  """Rows of a (gzipped) JSONL file; a bad line or field raises with file, line and field."""
  opener = gzip.open if path.endswith(".gz") else open
  rows = []
  with opener(path, "rt", encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
      if not isinstance(row, dict):
        raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
      for field, typ in required.items():
        if field not in row:
          raise ValueError(f"{path}:{lineno}: missing field {field!r}")
        if not isinstance(row[field], typ):
          raise ValueError(f"{path}:{lineno}: field {field!r} should be {typ}, "
                           f"got {type(row[field]).__name__}")
      rows.append(row)
  return rows


@dataclasses.dataclass(frozen=True)
class Task:
  """A task as the loop sees it.  `load(split)` returns records with at least
  id, prompt, solution ("" if none) and answer; `verifier` scores completions."""
  name: str
  splits: tuple
  load: Callable[[str], list[dict]]
  verifier: object
  stop: str = ""  # text after which a completion is cut (besides EOS)
  step_checker: Callable | None = None  # solution -> [bool per step], where steps are checkable


TASKS: dict[str, Task] = {}


def register(task: Task, vocabulary_fn=None) -> Task:
  """Adds the task to our registry and, when seqio is importable, as a seqio Task
  with features inputs (the prompt) and targets (the reference solution)."""
  TASKS[task.name] = task
  try:
    import seqio
  except ImportError:  # the accelerator image may lack TensorFlow/seqio
    return task
  if task.name in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(task.name)
  seqio.TaskRegistry.add(
      task.name,
      source=seqio.FunctionDataSource(_dataset_fn(task), splits=task.splits),
      preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim],
      output_features=seqio_features(vocabulary_fn),
      metric_fns=[])
  return task


def seqio_features(vocabulary_fn=None):
  import seqio
  vocab = vocabulary_fn() if vocabulary_fn else seqio.ByteVocabulary()
  return {"inputs": seqio.Feature(vocab, add_eos=False),
          "targets": seqio.Feature(vocab, add_eos=True)}


def _dataset_fn(task: Task):
  def fn(split, shuffle_files=False, seed=None):
    import tensorflow as tf
    rows = task.load(split)
    return tf.data.Dataset.from_tensor_slices({
        "inputs": [r["prompt"] for r in rows],
        "targets": [r.get("solution") or "" for r in rows],
        "answer": [str(r.get("answer", "")) for r in rows],
        "id": [str(r["id"]) for r in rows]})
  return fn


def register_jsonl(name: str, path: str, vocabulary_fn=None) -> None:
  """A seqio task over a JSONL file of {prompt, completion, reward} rows (the
  kept samples of an E-step), split 'train'."""
  import seqio

  def fn(split, shuffle_files=False, seed=None):
    import tensorflow as tf
    rows = read_jsonl(path, {"prompt": str, "completion": str})
    return tf.data.Dataset.from_tensor_slices({
        "inputs": [r["prompt"] for r in rows], "targets": [r["completion"] for r in rows],
        "reward": [float(r.get("reward", 1.0)) for r in rows], "id": [str(r.get("id", "")) for r in rows]})
  if name in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(name)
  seqio.TaskRegistry.add(
      name, source=seqio.FunctionDataSource(fn, splits=("train",)),
      preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim],
      output_features=seqio_features(vocabulary_fn), metric_fns=[])


def get(name: str) -> Task:
  import tasks  # noqa: F401  (registers every module)
  if name not in TASKS:
    raise KeyError(f"unknown task {name!r}; known: {sorted(TASKS)}")
  return TASKS[name]
