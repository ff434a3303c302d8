"""Verifiers: the binary reward ReST^EM trains on, computed on the host.

`verify_batch(verifier, records)` is what the loop calls between sampling and
training: it grades (problem, completion) records in a pool of worker
threads sized to the host's cores (the work itself runs in child processes:
the code sandboxes and the sympy workers, one per thread) and returns a float32 reward per
completion, the per-record verdicts and counts per verdict.

A verifier is any picklable callable `(problem: dict, completion: str) ->
Result`.  Adding a task's verifier is one small function or class, e.g.

    def my_verifier(problem, completion):
      ok = completion.strip() == problem["answer"]
      return Result(float(ok), "passed" if ok else "wrong_answer")
"""
from __future__ import annotations

import collections
import concurrent.futures as cf
import dataclasses
import os
from typing import Callable, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Result:
  reward: float
  status: str  # "passed", "wrong_answer", "no_answer", "timeout", ...
  detail: str = ""  # for people: the answer as written, test cases passed, an error
  answer: str | None = None  # the normalised final answer (the majority-vote key), if any


Verifier = Callable[[dict, str], Result]


@dataclasses.dataclass(frozen=True)
class MathVerifier:
  """Final-answer check against problem[answer_key] (MATH, GSM8K, arith)."""
  answer_key: str = "answer"
  timeout_s: float = 1.0  # sympy stage; a call stays under 2 s

  def __call__(self, problem: dict, completion: str) -> Result:
    from restem_jax.verifiers import math as vm
    given = vm.extract_answer(completion)
    if given is None:
      return Result(0.0, "no_answer")
    ok = vm.is_equivalent(given, str(problem[self.answer_key]), self.timeout_s)
    return Result(float(ok), "passed" if ok else "wrong_answer", given[:100], vm.normalize(given))


@dataclasses.dataclass(frozen=True)
class AppsVerifier:
  """Runs the completion against problem["input_output"] in the sandbox."""
  timeout_s: float | None = None  # default: case_timeout_s per case + 5 s
  case_timeout_s: float = 4.0
  allow_unisolated: bool = False  # without bubblewrap: run with rlimits only (else refuse)

  def __call__(self, problem: dict, completion: str) -> Result:
    from restem_jax.verifiers import code
    v = code.run_tests(code.apps_prompt_program(completion), problem["input_output"],
                       self.timeout_s, case_timeout_s=self.case_timeout_s,
                       allow_unisolated=self.allow_unisolated)
    return Result(float(v.passed), v.status, f"{v.passed_cases}/{v.total_cases}")


@dataclasses.dataclass(frozen=True)
class HumanEvalVerifier:
  """Runs prompt + completion + the task's check() in the sandbox."""
  timeout_s: float = 10.0
  allow_unisolated: bool = False  # without bubblewrap: run with rlimits only (else refuse)

  def __call__(self, problem: dict, completion: str) -> Result:
    from restem_jax.verifiers import code
    head = problem["problem"] if "problem" in problem else problem["prompt"]  # the signature + docstring
    v = code.run_humaneval(head + completion, problem["test"], problem["entry_point"],
                           self.timeout_s, allow_unisolated=self.allow_unisolated)
    return Result(float(v.passed), v.status)


def _safe(verifier: Verifier, problem: dict, completion: str) -> Result:
  from restem_jax.verifiers import sandbox
  try:
    return verifier(problem, completion)
  except sandbox.SandboxUnavailableError:
    raise  # no isolation: stop the run, never score every program 0
  except Exception as e:  # noqa: BLE001 - a verifier bug must not lose the batch
    return Result(0.0, "verifier_error", f"{type(e).__name__}: {e}"[:300])


def default_workers() -> int:
  return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def verify_batch(verifier: Verifier, records: Sequence[tuple[dict, str]], *,
                 workers: int | None = None, progress: bool | Callable = False,
                 desc: str = "verifying"):
  """Rewards (float32 [N]), results (list[Result]) and a Counter of statuses.

  Runs `workers` verifications at a time (default: one per core; 0 or 1 = one
  by one).  Untrusted code and sympy run in child processes, so threads give
  real parallelism and nothing is forked from a parent holding JAX threads.
  `progress=True` shows a tqdm bar; a callable gets the number done.
  """
  workers = default_workers() if workers is None else workers
  records = list(records)
  bar = None
  if progress is True:
    from tqdm.auto import tqdm
    bar = tqdm(total=len(records), desc=desc, unit="sample", leave=False, disable=None)
  results: list[Result] = []
  def done(r):
    results.append(r)
    if bar is not None:
      bar.update(1)
    elif callable(progress):
      progress(len(results))

  if workers <= 1:
    for p, c in records:
      done(_safe(verifier, p, c))
  else:
    with cf.ThreadPoolExecutor(workers) as pool:
      for r in pool.map(lambda pc: _safe(verifier, *pc), records):
        done(r)
  if bar is not None:
    bar.close()
  rewards = np.asarray([r.reward for r in results], np.float32)
  return rewards, results, collections.Counter(r.status for r in results)
