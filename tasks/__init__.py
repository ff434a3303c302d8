"""Tasks, one module per domain.  `get(name, **changes)` returns a Task value,
e.g. `get("math", data_dir="/data", prompt="Q: {problem}\nA: ")`.  Importing
`tasks.seqio_tasks` registers them as seqio tasks too (needs TensorFlow)."""
from __future__ import annotations

import dataclasses

from tasks import apps, arith, common, gsm8k, humaneval, math  # noqa: F401  (common: tasks.common)
from tasks.common import ChatFormat, Task, chat  # noqa: F401

TASKS = {t.name: t for t in (arith.TASK, math.TASK, gsm8k.TASK, apps.TASK, humaneval.TASK)}


def get(name: str, **changes) -> Task:
  """The task `name` with fields replaced (data_dir, prompt, options, stop, ...);
  empty or None values keep the default."""
  if name not in TASKS:
    raise KeyError(f"unknown task {name!r}; known: {sorted(TASKS)}")
  task = TASKS[name]
  changes = {k: v for k, v in changes.items() if v not in (None, "")}
  if name == "arith" and "options" in changes:  # the splits follow the sizes
    task = arith.make(changes.pop("options"), task.prompt)
  return dataclasses.replace(task, **changes)
