"""Runs untrusted code inside the sandbox process (stdlib only; never imported
by the trusted side).  Usage: python -I _harness.py SPEC_JSON RESULT_FD, or
`run_spec` in a child forked by the warm worker (_zygote.py).

Spec: {"mode": "stdin" | "call" | "script", "program": str, "inputs": [...],
"fn_name": str, "finish_flag": str, "case_timeout_s": float, "memory_bytes": int, "output_bytes": int,
"block_network": bool}.  One JSON line per test case goes to RESULT_FD:
{"i": case, "status": "ok" | "timeout" | "runtime_error" | "memory_limit" |
"output_limit" | "compile_error", "out": ...}, then {"done": true}.  Expected
outputs never enter the sandbox: the trusted parent compares.
"""
import io
import json
import os
import resource
import signal
import sys


class _CaseTimeout(BaseException):
  pass


class _OutputLimit(BaseException):
  pass


class _CappedWriter(io.TextIOBase):
  def __init__(self, cap):
    self.parts, self.size, self.cap = [], 0, cap

  def writable(self):
    return True

  def write(self, s):
    s = str(s)
    self.size += len(s)
    if self.size > self.cap:
      raise _OutputLimit()
    self.parts.append(s)
    return len(s)

  def getvalue(self):
    return "".join(self.parts)


def _limit(kind, value):
  try:
    resource.setrlimit(kind, (value, value))
  except (ValueError, OSError):
    pass


def _on_alarm(signum, frame):
  raise _CaseTimeout()


def _status(exc):
  if isinstance(exc, _CaseTimeout):
    return "timeout"
  if isinstance(exc, MemoryError):
    return "memory_limit"
  if isinstance(exc, _OutputLimit):
    return "output_limit"
  if isinstance(exc, RecursionError):
    return "runtime_error"
  return "runtime_error"


def _jsonable(value):
  """JSON form of a returned value; objects that JSON cannot express become a
  tagged repr, which never equals an expected output."""
  try:
    return json.loads(json.dumps(value, allow_nan=True))
  except (TypeError, ValueError, RecursionError, OverflowError):
    try:
      return {"__unserializable__": repr(value)[:200]}
    except BaseException:  # noqa: BLE001
      return {"__unserializable__": "?"}


def main():
  spec_path, fd = sys.argv[1], int(sys.argv[2])
  with open(spec_path) as f:
    spec = json.load(f)
  os.remove(spec_path)
  run_spec(spec, fd)


def run_spec(spec, fd):
  """Drops to the run's uid and limits, runs the program's cases, reports on fd, exits."""
  sys.path.extend(spec.get("extra_paths") or [])
  import builtins  # python -S does not define exit()/quit(); programs use them
  builtins.exit = builtins.quit = sys.exit
  results = os.fdopen(fd, "w", buffering=1)
  emit = lambda obj: results.write(json.dumps(obj) + "\n")  # noqa: E731
  if spec.get("run_as_uid") is not None:  # root inside bwrap: become a fresh, powerless uid
    os.setgroups([])
    os.setgid(spec["run_as_uid"])
    os.setuid(spec["run_as_uid"])
    _limit(resource.RLIMIT_NPROC, spec["max_tasks"])  # this run's processes + threads
  _limit(resource.RLIMIT_AS, spec["memory_bytes"])
  _limit(resource.RLIMIT_CORE, 0)
  _limit(resource.RLIMIT_NOFILE, 64)
  if spec.get("block_network"):  # fallback when no network namespace is available
    import socket

    def _no_network(*a, **k):
      raise OSError("network access is disabled in the sandbox")
    socket.socket = _no_network
    socket.create_connection = _no_network
  signal.signal(signal.SIGALRM, _on_alarm)
  sys.setrecursionlimit(10_000)
  _set_limit = sys.setrecursionlimit
  # Solutions often raise the limit to 10**9; unbounded recursion should end
  # in RecursionError, not in gigabytes of frames.
  sys.setrecursionlimit = lambda n: _set_limit(min(int(n), 200_000))
  real_stdin, real_stdout = sys.stdin, sys.stdout
  try:
    code = compile(spec["program"], "<solution>", "exec")
  except BaseException as e:  # noqa: BLE001
    emit({"i": -1, "status": "compile_error", "out": repr(e)[:500]})
    emit({"done": True})
    return
  mode, timeout = spec["mode"], spec["case_timeout_s"]
  error = [""]

  def run(fn):
    """(status, stdout text, return value) of fn() under the per-case limits."""
    out = _CappedWriter(spec["output_bytes"])
    error[0] = ""
    sys.stdout = out
    value, status = None, "ok"
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
      value = fn()
    except SystemExit:
      pass  # a program may end itself after printing its answer
    except BaseException as e:  # noqa: BLE001
      status = _status(e)
      error[0] = f"{type(e).__name__}: {e}"[:300]
    finally:
      signal.setitimer(signal.ITIMER_REAL, 0)
      sys.stdout, sys.stdin = real_stdout, real_stdin
    return status, out.getvalue(), value

  if mode == "stdin":
    for i, inp in enumerate(spec["inputs"]):
      def case(inp=inp):
        sys.stdin = io.StringIO(inp if isinstance(inp, str) else "\n".join(map(str, inp)))
        exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
      status, out, _ = run(case)
      emit({"i": i, "status": status, "out": out})
  elif mode == "call":
    env = {"__name__": "__solution__", "__builtins__": __builtins__}
    status, _, _ = run(lambda: exec(code, env))
    if status != "ok":
      emit({"i": -1, "status": status, "out": "while defining the solution: " + error[0]})
    else:
      name = spec["fn_name"]
      fn = env.get(name)
      if fn is None and "Solution" in env:
        fn = getattr(env["Solution"](), name, None)
      if fn is None:
        emit({"i": -1, "status": "runtime_error", "out": f"no function {name!r}"})
      else:
        for i, args in enumerate(spec["inputs"]):
          status, _, value = run(lambda args=args: fn(*json.loads(json.dumps(args))))
          emit({"i": i, "status": status, "out": _jsonable(value) if status == "ok" else None})
  else:  # script: ok when it runs to its last line (HumanEval: asserts inside check())
    env = {"__name__": "__main__", "__builtins__": __builtins__}
    status, out, _ = run(lambda: exec(code, env))
    if status == "ok" and env.get(spec["finish_flag"]) is not True:
      status, out = "runtime_error", "exited before the tests finished"
    emit({"i": 0, "status": status, "out": out[-2000:]})
  emit({"done": True})
  results.flush()
  os._exit(0)


if __name__ == "__main__":
  main()
