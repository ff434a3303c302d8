"""What every task module shares: the Task value, where data lives, checked
JSONL reading.

A Task is a frozen value: its reader, prompt format, data folder, options and
verifier travel with it, and a variant is `dataclasses.replace(task, ...)` or
`tasks.get(name, data_dir=..., prompt=..., options=...)`.  Nothing here is
configured by mutating module state.  seqio registration lives in
`tasks.seqio_tasks` (it needs TensorFlow; the loop does not).
"""
from __future__ import annotations

import dataclasses
import functools
import gzip
import json
import os
from typing import Any, Callable

DEFAULT_DATA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "..", "shared", "data")


def resolve_data_dir(data_dir: str = "") -> str:
  """`data_dir`, else $RESTEM_DATA_DIR, else ../shared/data beside the project."""
  return os.path.abspath(data_dir or os.environ.get("RESTEM_DATA_DIR") or DEFAULT_DATA_DIR)


def data_path(data_dir: str, *parts: str) -> str:
  path = os.path.join(data_dir, *parts)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: data file not found (set RESTEM_DATA_DIR, the DATA_DIR gin "
                            "macro or Task.data_dir to the folder holding math/, gsm8k/, apps/, "
                            "humaneval/)")
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
  """A task as the loop sees it.

  `read(split, data_dir, options)` returns records with at least id, problem,
  solution ("" if none) and answer; `load(split)` adds each record's `prompt`,
  made by `prompt`: a template filled from the record's fields
  ("{problem}=") or a function of the record.  `verifier(record, completion)`
  scores completions.
  """
  name: str
  splits: tuple
  read: Callable[[str, str, Any], list[dict]]
  verifier: object
  prompt: str | Callable[[dict], str] = "{problem}"
  data_dir: str = ""  # "" = $RESTEM_DATA_DIR or ../shared/data
  options: Any = None  # the task's own knobs (arith: ArithConfig; apps: difficulties)
  stop: str = ""  # text after which a completion is cut (besides EOS)
  step_checker: Callable | None = None  # (solution, record) -> [bool per step], where steps are checkable
  step_separator: str = r"\n+"  # regex between a solution's steps (reward models)
  step_labels: Callable | None = None  # (solution, step spans, answer correct, record) -> [+1/0/-1 per step]
  # (task, options) -> the task with these options, where they change more than `options`
  # (arith: its splits follow the sizes); options may come as a dict of the options' fields
  configure: Callable | None = None

  def format_prompt(self, record: dict) -> str:
    if callable(self.prompt):
      return self.prompt(record)
    try:
      return self.prompt.format(**record)
    except KeyError as e:
      raise ValueError(f"task {self.name}: prompt template {self.prompt!r} names field {e}, "
                       f"which its records lack (fields: {sorted(record)})") from None

  def load(self, split: str) -> list[dict]:
    if split not in self.splits:
      raise KeyError(f"{self.name}: unknown split {split!r}; splits: {list(self.splits)}")
    return _load(self, split, resolve_data_dir(self.data_dir))


def as_options(cls, value, task_name: str):
  """`value` as the options dataclass `cls`: an instance as it is, a dict of its fields
  (so a run file needs no gin registration: `task_options = {'digitsum': {'seed': 1}}`)."""
  if isinstance(value, cls):
    return value
  if isinstance(value, dict):
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(value) - fields)
    if unknown:
      raise ValueError(f"task {task_name}: unknown options {unknown}; {cls.__name__} has {sorted(fields)}")
    return cls(**value)
  raise TypeError(f"task {task_name}: options should be a {cls.__name__} or a dict of its fields, "
                  f"got {type(value).__name__}")


@functools.lru_cache(maxsize=64)
def _load(task: Task, split: str, data_dir: str) -> list[dict]:
  return [dict(r, prompt=task.format_prompt(r)) for r in task.read(split, data_dir, task.options)]


@dataclasses.dataclass(frozen=True)
class ChatFormat:
  """Prompts for instruct models, rendered with the tokenizer's chat template.

  The user turn is the task's own prompt plus `instruction`; `system` replaces
  the template's default system prompt (None keeps it); `shots` worked solutions of `shots_split` go first as user /
  assistant turns."""
  system: str | None = None
  instruction: str = ""
  shots: int = 0
  shots_split: str = "train"


def chat(task: Task, vocab, fmt: ChatFormat) -> Task:
  """`task` with its prompts rendered by `vocab.apply_chat_template`."""
  base = task.format_prompt
  user = lambda r: base(r) + fmt.instruction  # noqa: E731
  shots = [s for s in task.load(fmt.shots_split) if s.get("solution")][:fmt.shots] if fmt.shots else []
  head = [] if fmt.system is None else [{"role": "system", "content": fmt.system}]
  for s in shots:
    head += [{"role": "user", "content": user(s)}, {"role": "assistant", "content": s["solution"]}]

  def prompt(record: dict) -> str:
    return vocab.apply_chat_template(head + [{"role": "user", "content": user(record)}])
  return dataclasses.replace(task, prompt=prompt)
