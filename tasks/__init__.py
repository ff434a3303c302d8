"""Tasks, one module per domain.  `get(name, **changes)` returns a Task value,
e.g. `get("math", data_dir="/data", prompt="Q: {problem}\nA: ")`.  Importing
`tasks.seqio_tasks` registers them as seqio tasks too (needs TensorFlow)."""
from __future__ import annotations

import dataclasses

from tasks import apps, arith, common, gsm8k, humaneval, math  # noqa: F401  (common: tasks.common)
from tasks.common import ChatFormat, Task, chat  # noqa: F401

TASKS: dict[str, Task] = {}  # the registry: name -> Task


def register(task: Task) -> Task:
  """Adds `task` to the registry under its name (a task module's one line:
  `tasks.register(TASK)`, run when the module is imported, e.g. by `import my_task`
  at the top of a run file); a name registered again is replaced."""
  TASKS[task.name] = task
  return task


for _task in (arith.TASK, math.TASK, gsm8k.TASK, apps.TASK, humaneval.TASK):
  register(_task)


def get(name: str, **changes) -> Task:
  """The task `name` with fields replaced (data_dir, prompt, options, stop, ...);
  empty or None values keep the default.  Options go through the task's
  `configure` where it has one (arith: the splits follow the sizes)."""
  if name not in TASKS:
    raise KeyError(f"unknown task {name!r}; known: {sorted(TASKS)} (a task of your own: "
                   f"tasks.register(TASK) in its module, and `import` the module in the run file)")
  task = TASKS[name]
  changes = {k: v for k, v in changes.items() if v not in (None, "")}
  if "options" in changes and task.configure is not None:
    task = task.configure(task, changes.pop("options"))
  return dataclasses.replace(task, **changes)
