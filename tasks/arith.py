"""`arith`: the built-in task that needs no files.

Problems are integer expressions evaluated left to right, e.g. `3+3*8+4`
means ((3+3)*8)+4.  Worked solutions write one checkable step per operation:
`3+3=6;6*8=48;48+4=52` then `#### 52` (the answer line the math grader
reads).  Everything is generated deterministically from a seed; splits never
share a problem:
  human       problems with worked solutions (the "human data" for SFT)
  pool        problems with answers only (what ReST^EM trains on)
  validation, test      same distribution as the pool
  test_ood    harder: more operations (transfer)
"""
from __future__ import annotations

import dataclasses
import functools
import random
import re

from restem_jax.verifiers import MathVerifier
from tasks import common


@dataclasses.dataclass(frozen=True)
class ArithConfig:
  seed: int = 0
  min_ops: int = 2
  max_ops: int = 3
  ood_ops: int = 4
  max_operand: int = 9
  max_value: int = 99  # every intermediate result stays in [0, max_value]
  ops: str = "+-*"
  sizes: tuple = (("human", 500), ("pool", 3000), ("validation", 200), ("test", 500),
                  ("test_ood", 300))


def _apply(a: int, op: str, b: int) -> int:
  return a + b if op == "+" else a - b if op == "-" else a * b


def make_problem(rng: random.Random, num_ops: int, cfg: ArithConfig):
  """(expression, steps, answer) with all intermediates in [0, max_value]."""
  while True:
    nums = [rng.randint(0, cfg.max_operand) for _ in range(num_ops + 1)]
    ops = [rng.choice(cfg.ops) for _ in range(num_ops)]
    acc, steps = nums[0], []
    for op, b in zip(ops, nums[1:]):
      new = _apply(acc, op, b)
      if not 0 <= new <= cfg.max_value:
        break
      steps.append(f"{acc}{op}{b}={new}")
      acc = new
    else:
      expr = str(nums[0]) + "".join(f"{op}{b}" for op, b in zip(ops, nums[1:]))
      return expr, steps, acc


def solution_text(steps: list[str], answer: int) -> str:
  return ";".join(steps) + f"\n#### {answer}"


_STEP = re.compile(r"^(-?\d+)([-+*])(-?\d+)=(-?\d+)$")


def operations(problem: str) -> tuple[int, list[tuple[str, int]]]:
  """`3+3*8` -> (3, [("+", 3), ("*", 8)]): the first operand, then each operation
  in the order it is evaluated (left to right)."""
  nums, ops = re.findall(r"\d+", problem), re.findall(r"[-+*]", problem)
  if len(nums) != len(ops) + 1:
    raise ValueError(f"arith: {problem!r} is not an expression of this task")
  return int(nums[0]), list(zip(ops, map(int, nums[1:])))


def _check_step(step: str, prev: int | None, expected: tuple[str, int] | None = None
                ) -> tuple[bool, int | None]:
  """Is `a op b = c` right, does `a` chain from the previous result, and (with
  `expected`, the problem's next operation) is it that operation?  (ok, c)"""
  m = _STEP.match(step.strip())
  if not m:
    return False, prev
  a, op, b, c = int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))
  ok = _apply(a, op, b) == c and (prev is None or a == prev)
  return ok and (expected is None or (op, b) == expected), c


def _steps(pieces: list[str], record: dict | None) -> list[bool]:
  """Per calculation step: right, chained and (with the problem) the next
  operation of `record["problem"]`, the first step starting from its first
  operand; a step past the problem's operations is wrong."""
  if record is None:
    out, prev = [], None
    for piece in pieces:
      ok, prev = _check_step(piece, prev)
      out.append(ok)
    return out
  prev, todo = operations(record["problem"])
  out = []
  for k, piece in enumerate(pieces):
    ok, prev = _check_step(piece, prev, todo[k] if k < len(todo) else None)
    out.append(ok and k < len(todo))
  return out


def check_steps(solution: str, record: dict | None = None) -> list[bool]:
  """Per step of a solution: is `a op b = c` right, does `a` chain from the
  previous result and, given the problem's record, is the step the problem's
  next operation (the first from its first operand)?  Without the record, only
  arithmetic and chaining are checked (a step may compute something else)."""
  body = solution.split("####")[0].strip()
  return _steps([s for s in body.split(";") if s], record)


STEP_SEPARATOR = r"[;\n]+"  # steps are `a op b = c` pieces, then the `#### N` line


def step_ratings(solution: str, spans: list[tuple[int, int]], correct: bool,
                 record: dict | None = None) -> list[int]:
  """Exact PRM labels (+1 / -1) of the steps at `spans` (split by STEP_SEPARATOR):
  a calculation step by `check_steps`' rules (given the record: the problem's
  next operation, rightly computed), the answer line by the verifier's verdict."""
  pieces = [solution[a:b] for a, b in spans]
  calc = [p for p in pieces if not p.startswith("####")]
  it = iter(_steps(calc, record))
  return [(1 if correct else -1) if p.startswith("####") else (1 if next(it) else -1) for p in pieces]


@functools.lru_cache(maxsize=8)
def _all_splits(cfg: ArithConfig) -> dict[str, list[dict]]:
  seen: set[str] = set()
  splits = {}
  # evaluation splits first, so training splits can avoid them
  order = sorted(dict(cfg.sizes), key=lambda s: s not in ("test", "validation", "test_ood"))
  sizes = dict(cfg.sizes)
  for split in order:
    rng = random.Random(f"{cfg.seed}:{split}")
    rows = []
    attempts = 0
    while len(rows) < sizes[split]:
      attempts += 1
      if attempts > 200 * sizes[split] + 1000:
        raise ValueError(f"arith: cannot draw {sizes[split]} distinct '{split}' problems with "
                         f"these knobs ({cfg}); lower the size or widen the ranges")
      n = cfg.ood_ops if split == "test_ood" else rng.randint(cfg.min_ops, cfg.max_ops)
      expr, steps, ans = make_problem(rng, n, cfg)
      if expr in seen:
        continue
      seen.add(expr)
      rows.append(dict(id=f"arith/{split}/{len(rows)}", problem=expr,
                       solution=solution_text(steps, ans) if split == "human" else "",
                       answer=str(ans), num_ops=n))
    splits[split] = rows
  return splits


def read(split: str, data_dir: str, options: ArithConfig | None) -> list[dict]:
  """Generated, no files: `data_dir` is not used."""
  return _all_splits(options or ArithConfig())[split]


def configure(task: common.Task, options) -> common.Task:
  """`task` with these knobs (an ArithConfig or a dict of its fields): its splits follow `sizes`."""
  options = common.as_options(ArithConfig, options, task.name)
  return dataclasses.replace(task, splits=tuple(dict(options.sizes)), options=options)


def make(options: ArithConfig = ArithConfig(), prompt: str = "{problem}=") -> common.Task:
  """The arith task with these knobs (splits follow `options.sizes`)."""
  return configure(common.Task(name="arith", splits=(), read=read, verifier=MathVerifier(), prompt=prompt,
                               step_checker=check_steps, step_separator=STEP_SEPARATOR,
                               step_labels=step_ratings, configure=configure), options)


TASK = make()
