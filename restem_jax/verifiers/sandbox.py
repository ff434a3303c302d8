"""Runs untrusted (model-written) Python in an isolated child process.

Isolation, strongest first:
  * bubblewrap (`bwrap`): new PID, network, mount, IPC, UTS, user and cgroup
    namespaces; read-only system and Python directories, nothing else of the
    host file system; a private /tmp; an empty working directory (deleted
    afterwards); a cleared environment; all capabilities dropped;
    --die-with-parent; the whole process tree dies with the namespace.
  * always (inside bwrap too): rlimits for address space (memory), CPU time,
    file size, number of processes (0: no fork), open files, no core dumps;
    wall-clock timeout after which the process group is SIGKILLed; stdout and
    stderr go to a size-capped file; per-test-case timers in the harness.
Without a usable bwrap (not installed, or user namespaces disabled) nothing
runs: `run` raises SandboxUnavailableError saying how to install it.  Only
with `Limits(allow_unisolated=True)` (the verifiers' `allow_unisolated`, the
entry points' `allow_unisolated_code` gin binding) does untrusted code run
with the rlimits, a scrubbed environment, a temporary directory and sockets
disabled inside the harness, the network and the user's files otherwise
reachable; a warning says so.  Code never runs in the caller's process: the
only thing that comes back is JSON on a pipe, and the caller compares outputs
itself.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import resource
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings

from restem_jax.verifiers import workers

HARNESS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_harness.py")
ZYGOTE = os.path.join(os.path.dirname(HARNESS), "_zygote.py")


@dataclasses.dataclass(frozen=True)
class Limits:
  timeout_s: float = 10.0  # wall clock for the whole program (all test cases)
  case_timeout_s: float = 4.0  # per test case
  memory_mb: int = 1024
  output_kb: int = 1024  # stdout/stderr cap
  file_kb: int = 1024  # largest file the program may write
  max_tasks: int = 4  # processes + threads of the run (enforced when run under a fresh uid)
  site_packages: bool = True  # programs may import the base Python's packages (numpy, ...)
  warm: bool = True  # fork each program from a warm worker in a long-lived sandbox (needs root)
  allow_unisolated: bool = False  # without a usable bwrap: run with rlimits only (else refuse)


@dataclasses.dataclass
class RunResult:
  cases: dict  # case index -> {"status", "out"}
  finished: bool  # the harness reported "done"
  timed_out: bool  # killed at the wall-clock limit
  returncode: int
  output_overflow: bool
  stderr_tail: str
  elapsed_s: float


def _python() -> str:
  return os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)


@functools.lru_cache(maxsize=1)
def bwrap_problem() -> str:
  """Why bubblewrap cannot isolate programs here ("" when it can)."""
  exe = shutil.which("bwrap")
  if not exe:
    return "bwrap is not installed (not on PATH)"
  try:
    r = subprocess.run([exe, *_bwrap_base_args("/tmp"), "--", _python(), "-c", "print(1)"],
                       capture_output=True, timeout=20)
  except (OSError, subprocess.TimeoutExpired) as e:
    return f"{exe} did not start a sandbox ({type(e).__name__}: {e})"
  if r.returncode == 0 and r.stdout.strip() == b"1":
    return ""
  return f"{exe} failed (exit {r.returncode}: {r.stderr.decode(errors='replace').strip()[-300:]})"


def bwrap_available() -> bool:
  return not bwrap_problem()


class SandboxUnavailableError(RuntimeError):
  """No isolation for untrusted code here, and running without it was not allowed."""


def require_isolation(allow_unisolated: bool = False) -> bool:
  """True when bubblewrap isolates programs; False when it cannot and
  `allow_unisolated` (with a warning); else raises SandboxUnavailableError."""
  problem = bwrap_problem()
  if not problem:
    return True
  if not allow_unisolated:
    raise SandboxUnavailableError(
        f"refusing to run model-written code: {problem}, and without bubblewrap the sandbox "
        "cannot keep the network or your files from it. Install bubblewrap (`apt-get install "
        "bubblewrap`, or `make sandbox` as root; user namespaces must be enabled), or accept "
        "weaker isolation (rlimits, a scrubbed environment, a temporary directory) with "
        "sandbox.Limits(allow_unisolated=True), AppsVerifier/HumanEvalVerifier(allow_unisolated=True), "
        "or the gin binding --gin.restem_main.allow_unisolated_code=True (eval_main, reward_main, "
        "best_of_n_main alike).")
  _warn_fallback(problem)
  return False


# numerical libraries must not start a thread per core (the run may have 4 tasks)
_THREAD_ENV = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@functools.lru_cache(maxsize=1)
def _site_packages() -> list[str]:
  """This environment's site-packages (a virtualenv's too), bound read-only."""
  import site
  return [os.path.realpath(p) for p in site.getsitepackages() if os.path.isdir(p)]


def _ro_bind_with_parents(path: str) -> list[str]:
  parts = path.strip("/").split("/")
  args = []
  for i in range(1, len(parts)):  # traversable parents, even where the host's are 0700
    parent = "/" + "/".join(parts[:i])
    if parent != "/tmp":  # the sandbox's own tmpfs, mounted before any bind
      args += ["--perms", "0755", "--dir", parent]
  return args + ["--ro-bind", path, path]


def _bwrap_base_args(workdir: str) -> list[str]:
  prefix = os.path.realpath(sys.base_prefix)
  if os.geteuid() == 0:
    # As root: no user namespace, so the harness can drop to a fresh uid
    # (RLIMIT_NPROC is not enforced for root); every capability but the two
    # needed for that drop is removed.
    args = ["--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts",
            "--unshare-cgroup-try", "--cap-drop", "ALL", "--cap-add", "CAP_SETUID",
            "--cap-add", "CAP_SETGID"]
  else:
    args = ["--unshare-all", "--cap-drop", "ALL"]
  args += ["--die-with-parent", "--new-session", "--ro-bind", "/usr", "/usr"]
  for d in ("/bin", "/lib", "/lib64", "/lib32", "/sbin"):
    if os.path.islink(d):
      args += ["--symlink", os.readlink(d), d]
    elif os.path.isdir(d):
      args += ["--ro-bind", d, d]
  # The private /tmp comes before the Python binds: mounted after them, it would
  # hide a Python or a virtualenv that lives under /tmp (and every import from it).
  args += ["--proc", "/proc", "--dev", "/dev", "--perms", "1777", "--tmpfs", "/tmp"]
  if not prefix.startswith("/usr/"):
    args += _ro_bind_with_parents(prefix)
  for path in _site_packages():
    if not path.startswith(prefix + "/") and not path.startswith("/usr/"):
      args += _ro_bind_with_parents(path)
  args += ["--bind", workdir, "/sandbox", "--chdir", "/sandbox", "--clearenv",
           "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", "/sandbox",
           "--setenv", "LANG", "C.UTF-8", "--setenv", "PYTHONHASHSEED", "0",
           "--setenv", "PYTHONDONTWRITEBYTECODE", "1"]
  for k, v in _THREAD_ENV.items():
    args += ["--setenv", k, v]
  return args


class SandboxSetupError(RuntimeError):
  """The sandbox cannot see what the host's Python can import."""


# Probed inside the sandbox at first use: a package the host can import must
# import there too, or every program that uses it would silently get reward 0.
PROBE_MODULES = ("numpy",)


@functools.lru_cache(maxsize=1)
def check_imports(modules: tuple = PROBE_MODULES) -> tuple:
  """Imports `modules` (those the host has) inside a bubblewrap sandbox, once per
  process; raises SandboxSetupError naming what failed.  Returns the probed names."""
  import importlib.util
  present = tuple(m for m in modules if importlib.util.find_spec(m) is not None)
  paths = _site_packages()
  code = ("import json, os, sys\n"
          f"paths = {paths!r}\n"
          "sys.path.extend(paths)\n"
          "bad = {p: 'folder not visible' for p in paths if not os.path.isdir(p)}\n"
          f"for m in {present!r}:\n"
          "  try:\n"
          "    __import__(m)\n"
          "  except Exception as e:\n"
          "    bad[m] = f'{type(e).__name__}: {e}'\n"
          "print(json.dumps(bad))\n")
  with tempfile.TemporaryDirectory(prefix="restem_sandbox_probe_") as work:
    r = subprocess.run([shutil.which("bwrap"), *_bwrap_base_args(work), "--", _python(), "-I", "-S",
                        "-c", code], capture_output=True, timeout=60, text=True)
  try:
    bad = json.loads(r.stdout.strip().splitlines()[-1])
  except (ValueError, IndexError):
    bad = {"python": f"exit {r.returncode}: {r.stderr.strip()[-500:]}"}
  if bad:
    raise SandboxSetupError(
        "the code sandbox cannot import what this Python can, so every program that needs "
        f"it would get reward 0: {bad}. Interpreter {_python()}, site-packages {paths}. "
        "Check where the environment lives and what bubblewrap mounts "
        "(restem_jax/verifiers/sandbox.py: _bwrap_base_args).")
  return present


_warned = False


def _warn_fallback(problem: str):
  global _warned
  if not _warned:
    _warned = True
    msg = (f"bubblewrap is not usable here ({problem}) and allow_unisolated is set: untrusted code "
           "runs with rlimits, a scrubbed environment and a temporary directory only (no "
           "namespaces; sockets are disabled in-process). Install the 'bubblewrap' package for "
           "full isolation.")
    warnings.warn(msg, RuntimeWarning, stacklevel=3)
    logging.warning(msg)


def run(spec: dict, limits: Limits = Limits()) -> RunResult:
  """Runs the harness on `spec` (see _harness.py) isolated from everything else.

  As root with bubblewrap (and `limits.warm`), a warm worker in a long-lived
  sandbox forks a fresh child per program (_zygote.py: new uid, rlimits, empty
  directory, killed with everything it started, /tmp emptied); else a fresh
  sandbox per program.  Both run the same harness under the same limits."""
  isolated = require_isolation(limits.allow_unisolated)
  if isolated and limits.site_packages:
    check_imports()
  if isolated and limits.warm and os.geteuid() == 0:
    return _run_warm(spec, limits)
  return _run_cold(spec, limits, isolated)


def _fresh_uid() -> int:
  return 100_000 + secrets.randbelow(1 << 20)


def _full_spec(spec: dict, limits: Limits, isolated: bool, run_as) -> dict:
  return dict(spec, case_timeout_s=limits.case_timeout_s, memory_bytes=limits.memory_mb << 20,
              output_bytes=limits.output_kb << 10, block_network=not isolated,
              run_as_uid=run_as, max_tasks=limits.max_tasks,
              extra_paths=_site_packages() if limits.site_packages else [])


def _parse_results(buf: bytes) -> tuple[dict, bool]:
  cases, finished = {}, False
  for line in buf.split(b"\n"):
    try:
      obj = json.loads(line)
    except (ValueError, UnicodeDecodeError):
      continue
    if not isinstance(obj, dict):
      continue
    if obj.get("done") is True:
      finished = True
    elif isinstance(obj.get("i"), int) and obj["i"] not in cases:
      cases[obj["i"]] = {"status": str(obj.get("status")), "out": obj.get("out")}
  return cases, finished


def _result_cap(limits: Limits) -> int:
  return 4 * (limits.output_kb << 10) + (1 << 20)


def _run_cold(spec: dict, limits: Limits, isolated: bool) -> RunResult:
  """A fresh sandbox (bwrap + Python) for this program alone."""
  t0 = time.monotonic()
  host_dir = tempfile.mkdtemp(prefix="restem_sandbox_")
  try:
    work = os.path.join(host_dir, "work")
    os.mkdir(work)
    os.chmod(work, 0o777)
    # A fresh uid per run (as root inside bwrap): RLIMIT_NPROC then caps this run's tasks.
    run_as = _fresh_uid() if isolated and os.geteuid() == 0 else None
    spec = _full_spec(spec, limits, isolated, run_as)
    with open(os.path.join(work, ".spec.json"), "w") as f:
      json.dump(spec, f)
    shutil.copy(HARNESS, os.path.join(work, ".harness.py"))
    log_path = os.path.join(host_dir, "output.log")  # outside the sandbox's view
    read_fd, write_fd = os.pipe()
    # -S: `site` (and its .pth files) costs ~60 ms per start; this environment's
    # site-packages are put on sys.path by the harness instead.
    flags = ["-I", "-B", "-S"]
    if isolated:
      cmd = [shutil.which("bwrap"), *_bwrap_base_args(work), "--", _python(), *flags,
             "/sandbox/.harness.py", "/sandbox/.spec.json", str(write_fd)]
      cwd, env = host_dir, {}
    else:
      cmd = [_python(), *flags, os.path.join(work, ".harness.py"),
             os.path.join(work, ".spec.json"), str(write_fd)]
      cwd, env = work, {"PATH": "/usr/bin:/bin", "HOME": work, "LANG": "C.UTF-8",
                        "PYTHONHASHSEED": "0", **_THREAD_ENV}

    cpu_s = int(limits.timeout_s) + 1
    fsize = max(limits.output_kb, limits.file_kb) << 10

    def preexec():
      resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
      resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
      resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    with open(log_path, "wb") as log:
      proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                              pass_fds=(write_fd,), cwd=cwd, env=env, preexec_fn=preexec,
                              start_new_session=True)
    os.close(write_fd)
    buf, timed_out = b"", False
    deadline = t0 + limits.timeout_s
    os.set_blocking(read_fd, False)
    cap = _result_cap(limits)
    while True:
      remaining = deadline - time.monotonic()
      if remaining <= 0:
        timed_out = True
        break
      ready, _, _ = select.select([read_fd], [], [], min(remaining, 0.5))
      if ready:
        chunk = os.read(read_fd, 1 << 16)
        if not chunk:
          break  # every writer closed: the process tree ended
        buf += chunk
        if len(buf) > cap:
          break
      elif proc.poll() is not None:
        break  # exited; a leftover holder of the pipe is killed below
    if not timed_out:  # let it report its own exit status before the group is killed
      try:
        proc.wait(timeout=2)
      except subprocess.TimeoutExpired:
        pass
    _kill_group(proc)
    os.close(read_fd)
    cases, finished = _parse_results(buf)
    size = os.path.getsize(log_path)
    with open(log_path, "rb") as f:
      f.seek(max(0, size - 2000))
      tail = f.read().decode("utf-8", "replace")
    return RunResult(cases, finished, timed_out, proc.returncode,
                     size >= (limits.output_kb << 10) or proc.returncode == -signal.SIGXFSZ,
                     tail, time.monotonic() - t0)
  finally:
    shutil.rmtree(host_dir, ignore_errors=True)


class _WarmWorker:
  """One long-lived bubblewrap sandbox running _zygote.py (see there)."""

  def __init__(self):
    self.host_dir = tempfile.mkdtemp(prefix="restem_sandbox_warm_")
    cmd = [shutil.which("bwrap"), *_bwrap_base_args(self.host_dir),
           "--ro-bind", HARNESS, "/zygote/_harness.py", "--ro-bind", ZYGOTE, "/zygote/_zygote.py", "--",
           _python(), "-I", "-B", "-S", "/zygote/_zygote.py"]
    self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=subprocess.DEVNULL, cwd=self.host_dir, env={},
                                 start_new_session=True)
    self.pid = os.getpid()
    self._buf = b""

  def ask(self, spec: dict, wait_s: float) -> dict | None:
    """The worker's reply, or None if it died or did not answer within wait_s."""
    try:
      self.proc.stdin.write((json.dumps(spec) + "\n").encode())
      self.proc.stdin.flush()
      fd = self.proc.stdout.fileno()
      deadline = time.monotonic() + wait_s
      while b"\n" not in self._buf:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
          return None
        chunk = os.read(fd, 1 << 20)
        if not chunk:
          return None
        self._buf += chunk
      line, self._buf = self._buf.split(b"\n", 1)
      return json.loads(line)
    except (OSError, ValueError):
      return None

  def close(self) -> None:
    _kill_group(self.proc)
    shutil.rmtree(self.host_dir, ignore_errors=True)


_warm = workers.PerThread(_WarmWorker, alive=lambda w: w.proc.poll() is None, close=_WarmWorker.close)


def _run_warm(spec: dict, limits: Limits) -> RunResult:
  """The program in a child forked by this thread's warm worker."""
  t0 = time.monotonic()
  spec = dict(_full_spec(spec, limits, True, _fresh_uid()), timeout_s=limits.timeout_s,
              cpu_s=int(limits.timeout_s) + 1, file_bytes=max(limits.output_kb, limits.file_kb) << 10,
              result_cap=_result_cap(limits),
              env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONHASHSEED": "0", **_THREAD_ENV})
  reply = None
  for attempt in range(2):  # a worker that died (not the program's doing) is replaced once
    reply = _warm.get(fresh=attempt > 0).ask(spec, limits.timeout_s + 15)
    if reply is not None and "error" not in reply:
      break
  if reply is None or "error" in reply:
    _warm.get(fresh=True)
    detail = (reply or {}).get("error", "no answer")
    raise RuntimeError(f"the warm sandbox worker failed twice ({detail}); Limits(warm=False) "
                       "starts a fresh sandbox per program instead")
  cases, finished = _parse_results(reply["buf"].encode())
  code = reply["returncode"]
  return RunResult(cases, finished, reply["timed_out"], code,
                   reply["log_size"] >= (limits.output_kb << 10) or code == -signal.SIGXFSZ,
                   reply["log_tail"], time.monotonic() - t0)


def _kill_group(proc: subprocess.Popen) -> None:
  """SIGKILL the whole session/process group and reap the child."""
  try:
    os.killpg(proc.pid, signal.SIGKILL)
  except (ProcessLookupError, PermissionError):
    pass
  try:
    proc.wait(timeout=5)
  except subprocess.TimeoutExpired:
    proc.kill()
    proc.wait()
