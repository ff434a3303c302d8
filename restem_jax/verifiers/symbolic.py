"""Symbolic equality with sympy in a worker process that is killed at a timeout.

LaTeX is parsed with `latex2sympy2_extended` (a maintained ANTLR parser) and
compared with `simplify(a - b) == 0` (numerically double-checked).  Parsing
and simplification run in a separate long-lived process: a hostile input
(10^{10^{10}}, 9!!!!!!) that makes sympy hang or eat memory is killed with its
process at `timeout_s`, and a fresh worker is started for the next call.
"""
from __future__ import annotations

import json
import os
import resource
import select
import subprocess
import sys

from restem_jax.verifiers import workers

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_MEMORY_LIMIT_BYTES = 2 << 30
_START_TIMEOUT_S = 60.0


def _parse(s: str):
  from latex2sympy2_extended import latex2sympy
  return latex2sympy(s)


def _equal(a: str, b: str) -> bool:
  import sympy
  x, y = _parse(a), _parse(b)
  if isinstance(x, (tuple, list)) or isinstance(y, (tuple, list)):
    return False  # structures are compared element-wise by the caller
  if isinstance(x, sympy.Eq) and isinstance(y, sympy.Eq):
    x, y = x.lhs - x.rhs, y.lhs - y.rhs
    return bool(sympy.simplify(x - y) == 0 or sympy.simplify(x + y) == 0)
  if isinstance(x, sympy.Eq) or isinstance(y, sympy.Eq):
    return False
  if not (isinstance(x, sympy.Expr) and isinstance(y, sympy.Expr)):
    return bool(x == y)
  diff = sympy.simplify(x - y)
  return bool(diff == 0)


def _serve() -> None:
  """Worker main loop: JSON lines [a, b] on stdin -> "1"/"0" lines on stdout."""
  try:
    resource.setrlimit(resource.RLIMIT_AS, (_MEMORY_LIMIT_BYTES, _MEMORY_LIMIT_BYTES))
  except (ValueError, OSError):
    pass
  out = sys.stdout
  sys.stdout = sys.stderr  # keep stray prints out of the protocol
  _parse("x")  # import sympy and the parser before the first question
  out.write("ready\n")
  out.flush()
  for line in sys.stdin:
    try:
      a, b = json.loads(line)
      result = _equal(a, b)
    except BaseException:  # noqa: BLE001 - any parse/simplify failure means "not shown equal"
      result = False
    out.write("1\n" if result else "0\n")
    out.flush()


class _Worker:
  """One child process; `ask` returns None on timeout (and kills the child).
  The child imports sympy as it starts; `timeout_s` counts from a ready child."""

  def __init__(self):
    self.ready = False
    self.proc = subprocess.Popen(
        [sys.executable, "-m", "restem_jax.verifiers.symbolic"], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1,
        cwd=_ROOT, env={**os.environ, "PYTHONPATH": _ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")})

  def alive(self) -> bool:
    return self.proc.poll() is None

  def ask(self, a: str, b: str, timeout_s: float):
    try:
      if not self.ready:
        ready, _, _ = select.select([self.proc.stdout], [], [], _START_TIMEOUT_S)
        self.ready = bool(ready) and self.proc.stdout.readline().strip() == "ready"
        if not self.ready:
          raise OSError("the sympy worker did not start")
      self.proc.stdin.write(json.dumps([a, b]) + "\n")
      self.proc.stdin.flush()
      ready, _, _ = select.select([self.proc.stdout], [], [], timeout_s)
      if ready:
        line = self.proc.stdout.readline()
        if line:
          return line.strip() == "1"
    except (OSError, ValueError):
      pass
    self.kill()
    return None

  def kill(self):
    if self.alive():
      self.proc.kill()
    self.proc.wait()


_workers = workers.PerThread(_Worker, alive=_Worker.alive, close=_Worker.kill)


def symbolic_equal(a: str, b: str, timeout_s: float = 1.0) -> bool:
  """sympy equality of two LaTeX strings; False on parse failure or timeout.
  After a timeout the next worker starts at once, so it is ready (sympy
  imported, ~0.5 s) by the time the next question comes."""
  result = _workers.get().ask(a, b, timeout_s)
  if result is None:  # the hung worker is killed and the next one starts now
    _workers.get(fresh=True)
  return bool(result)


if __name__ == "__main__":
  _serve()
