"""Code verification: APPS-style tests and HumanEval, run in the sandbox.

Expected outputs stay in this (trusted) process; the sandbox only returns what
the program printed or returned, serialised as JSON, and the comparison
happens here.  So an object whose __eq__ always returns True cannot pass, and
a program that exits before its tests ran fails.
"""
from __future__ import annotations

import dataclasses
import json
import math
import secrets
from typing import Any

from restem_jax.verifiers import sandbox

# Imports the APPS harness makes available to solutions (LeetCode-style code
# uses `List` without importing it).
PRELUDE = ("import sys, math, itertools, collections, functools, heapq, bisect, string, re, random\n"
           "from typing import *\n"
           "from collections import Counter, OrderedDict, deque, defaultdict\n"
           "from functools import lru_cache, reduce\n"
           "from itertools import accumulate, product, permutations, combinations\n"
           "from heapq import *\n"
           "from math import sqrt, ceil, floor, gcd, log, log2, exp, inf\n")

STATUSES = ("passed", "wrong_answer", "timeout", "runtime_error", "compile_error",
            "memory_limit", "output_limit")


@dataclasses.dataclass
class Verdict:
  passed: bool
  status: str  # one of STATUSES
  passed_cases: int
  total_cases: int
  detail: str = ""


def _load(value, what: str):
  """APPS fields come as JSON strings (original files) or parsed JSON."""
  if isinstance(value, str):
    try:
      return json.loads(value) if value.strip() else None
    except json.JSONDecodeError as e:
      raise ValueError(f"{what}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
  return value


def _tokens_equal(a: str, b: str) -> bool:
  ta, tb = a.split(), b.split()
  if ta == tb:
    return True
  if len(ta) != len(tb):
    return False
  for x, y in zip(ta, tb):
    if x == y:
      continue
    try:
      fx, fy = float(x), float(y)
    except ValueError:
      return False
    if not math.isclose(fx, fy, rel_tol=1e-6, abs_tol=1e-6):
      return False
  return True


def stdout_matches(got: str, expected) -> bool:
  """APPS comparison: whitespace-insensitive lines, then numeric tolerance."""
  if isinstance(expected, list):
    expected = "\n".join(map(str, expected))
  expected = str(expected)
  if got.strip() == expected.strip():
    return True
  g = [line.strip() for line in got.strip().splitlines() if line.strip()]
  e = [line.strip() for line in expected.strip().splitlines() if line.strip()]
  if g == e:
    return True
  return _tokens_equal(got, expected)


def _values_equal(got: Any, expected: Any) -> bool:
  if isinstance(got, dict) and "__unserializable__" in got:
    return False
  if isinstance(got, bool) or isinstance(expected, bool):
    return type(got) is type(expected) and got == expected
  if isinstance(got, (int, float)) and isinstance(expected, (int, float)):
    return math.isclose(got, expected, rel_tol=1e-6, abs_tol=1e-9)
  if isinstance(got, list) and isinstance(expected, list):
    return len(got) == len(expected) and all(_values_equal(a, b) for a, b in zip(got, expected))
  if isinstance(got, dict) and isinstance(expected, dict):
    return got.keys() == expected.keys() and all(_values_equal(got[k], expected[k]) for k in got)
  return got == expected


def return_matches(got: Any, expected: Any) -> bool:
  """APPS call-based: outputs are often wrapped in a one-element list."""
  if _values_equal(got, expected):
    return True
  return isinstance(expected, list) and len(expected) == 1 and _values_equal(got, expected[0])


def _verdict_from(result: sandbox.RunResult, total: int, check) -> Verdict:
  """Turn the sandbox's per-case reports into a Verdict (check(i, out) -> bool)."""
  pre = result.cases.get(-1)
  if pre is not None:
    return Verdict(False, pre["status"] if pre["status"] in STATUSES else "runtime_error",
                   0, total, str(pre.get("out"))[:300])
  passed, first_bad, detail = 0, None, ""
  for i in range(total):
    case = result.cases.get(i)
    if case is None:  # the process died or was killed before reporting this case
      if result.timed_out:
        status = "timeout"
      elif result.output_overflow:
        status = "output_limit"
      elif result.returncode in (-24, 128 + 24):  # SIGXCPU: CPU-time limit
        status = "timeout"
      else:
        status = "runtime_error"
      detail = detail or f"no result for case {i} (exit code {result.returncode}) {result.stderr_tail[-300:]}"
    elif case["status"] != "ok":
      status = case["status"] if case["status"] in STATUSES else "runtime_error"
      if status == "runtime_error" and result.output_overflow:
        status = "output_limit"  # a write past the output cap failed (EFBIG)
    elif check(i, case["out"]):
      passed += 1
      continue
    else:
      status = "wrong_answer"
    first_bad = first_bad or status
  if first_bad is None and not result.finished:
    first_bad, detail = "runtime_error", "the program ended the test harness early"
  return Verdict(first_bad is None, first_bad or "passed", passed, total, detail)


def run_tests(program: str, tests, timeout_s: float | None = None, *, case_timeout_s: float = 4.0,
              memory_mb: int = 1024, limits: sandbox.Limits | None = None,
              allow_unisolated: bool = False) -> Verdict:
  """APPS tests {"inputs": [...], "outputs": [...], "fn_name"?: str} (dict or JSON string).

  All cases run in one sandboxed process, each under `case_timeout_s`; the
  whole run under `timeout_s` (default: case_timeout_s per case + 5 s).
  Without bubblewrap this refuses (sandbox.SandboxUnavailableError) unless
  `allow_unisolated`.
  """
  tests = _load(tests, "input_output")
  if not isinstance(tests, dict) or "inputs" not in tests or "outputs" not in tests:
    raise ValueError("input_output: expected an object with 'inputs' and 'outputs'")
  inputs, outputs = tests["inputs"], tests["outputs"]
  if len(inputs) != len(outputs):
    raise ValueError(f"input_output: {len(inputs)} inputs but {len(outputs)} outputs")
  if timeout_s is None:
    timeout_s = case_timeout_s * len(inputs) + 5.0
  limits = limits or sandbox.Limits(timeout_s=timeout_s, case_timeout_s=case_timeout_s,
                                    memory_mb=memory_mb, allow_unisolated=allow_unisolated)
  program = PRELUDE + program
  fn_name = tests.get("fn_name")
  if fn_name:
    spec = dict(mode="call", program=program, inputs=inputs, fn_name=fn_name)
    check = lambda i, out: return_matches(out, outputs[i])  # noqa: E731
  else:
    spec = dict(mode="stdin", program=program, inputs=inputs)
    check = lambda i, out: isinstance(out, str) and stdout_matches(out, outputs[i])  # noqa: E731
  return _verdict_from(sandbox.run(spec, limits), len(inputs), check)


def run_humaneval(program: str, test: str, entry_point: str, timeout_s: float = 10.0,
                  *, memory_mb: int = 1024, allow_unisolated: bool = False) -> Verdict:
  """HumanEval: `program` (prompt + completion), then `test`, then check(entry_point)."""
  flag = "_restem_finished_" + secrets.token_hex(8)
  source = f"{program}\n\n{test}\n\ncheck({entry_point})\n{flag} = True\n"
  limits = sandbox.Limits(timeout_s=timeout_s, case_timeout_s=timeout_s, memory_mb=memory_mb,
                          allow_unisolated=allow_unisolated)
  result = sandbox.run(dict(mode="script", program=source, inputs=[None], finish_flag=flag), limits)
  v = _verdict_from(result, 1, lambda i, out: True)
  if not v.passed and v.status == "runtime_error" and not v.detail:
    v.detail = str(result.cases.get(0, {}).get("out", ""))[-300:]
  return v


def apps_prompt_program(solution: str) -> str:
  """Strip a Markdown code fence from a model answer (```python ... ```)."""
  if "```" not in solution:
    return solution
  parts = solution.split("```")
  body = parts[1] if len(parts) > 1 else solution
  return body[len("python"):] if body.startswith("python") else body.lstrip("\n")
