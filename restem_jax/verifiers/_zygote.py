"""The warm sandbox worker: a long-lived process inside one bubblewrap sandbox
that forks a fresh, limited child per program (stdlib only; started by
sandbox.py as root of the sandbox's namespaces, never imported by the trusted
side).

Protocol: one JSON spec per line on stdin (the harness spec, with
"run_as_uid", "timeout_s", "cpu_s", "file_bytes", "env"); one JSON reply per
line on stdout: {"buf": the child's result lines, "returncode", "timed_out",
"log_size", "log_tail"}.

Per program, as in a fresh sandbox: a new uid (RLIMIT_NPROC then caps its
tasks, it cannot signal or read anything else), rlimits (address space, CPU,
file size, open files, no core), an empty 0700 working directory, a cleared
environment, its own session, stdout/stderr to a capped log it cannot name;
the network, mount and PID namespaces are the sandbox's.  After the verdict
every process of that uid is killed and everything it owns in /tmp and
/dev/shm is deleted, so nothing of one program is left for the next (it could
write nowhere else).
"""
import json
import os
import resource
import select
import shutil
from signal import SIGKILL
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness  # noqa: E402

# what the APPS prelude imports: loaded once here, not once per program
for _m in ("math", "itertools", "collections", "functools", "heapq", "bisect", "string", "re", "random",
           "typing", "io", "json", "fractions", "decimal"):
  __import__(_m)

CONTROL = "/tmp/.control"  # root-only: the logs


def _live_pids(uid):
  pids = []
  for d in os.listdir("/proc"):
    if not d.isdigit():
      continue
    try:
      with open(f"/proc/{d}/status") as f:
        status = f.read()
    except OSError:
      continue
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    if fields.get("Uid", "").split()[:1] == [str(uid)] and not fields.get("State", "").strip().startswith("Z"):
      pids.append(int(d))
  return pids


def _remove(path):
  """Deletes a file or a tree the caller owns, whatever modes a program left on it."""
  if os.path.isdir(path) and not os.path.islink(path):
    try:
      os.chmod(path, 0o700)
    except OSError:
      pass
    for root, dirs, _ in os.walk(path):
      for d in dirs:
        try:
          os.chmod(os.path.join(root, d), 0o700, follow_symlinks=False)
        except OSError:
          pass
    shutil.rmtree(path, ignore_errors=True)
  else:
    try:
      os.unlink(path)
    except OSError:
      pass


def _drop_to(uid):
  os.setgroups([])
  os.setgid(uid)
  os.setuid(uid)


def _kill_and_clean(uid):
  """SIGKILL every process of `uid` and delete what it left in /tmp and /dev/shm: a
  child that becomes `uid` does both (a program cannot hide from its own uid)."""
  for _ in range(100):
    pid = os.fork()
    if pid == 0:  # a forked child never returns into the worker's code
      try:
        _drop_to(uid)
        try:
          os.kill(-1, SIGKILL)
        except ProcessLookupError:
          pass  # nothing of this uid runs
        for folder in ("/tmp", "/dev/shm"):
          for name in os.listdir(folder) if os.path.isdir(folder) else ():
            path = os.path.join(folder, name)
            try:
              if os.lstat(path).st_uid == uid:
                _remove(path)
            except OSError:
              pass
      except BaseException:  # noqa: BLE001
        pass
      os._exit(0)
    os.waitpid(pid, 0)
    if not _live_pids(uid):
      return
  raise RuntimeError(f"processes of uid {uid} survive SIGKILL")


def _child(spec, work, log_fd, result_w, setup_w):
  """Becomes the program's process; says "ok" on setup_w (closed before the
  program runs) or why its set-up failed, so a broken sandbox is not mistaken
  for a failing program."""
  status_fd = setup_w
  try:
    os.setsid()
    _drop_to(spec["run_as_uid"])
    resource.setrlimit(resource.RLIMIT_NPROC, (spec["max_tasks"], spec["max_tasks"]))
    os.mkdir(work, 0o700)
    os.chdir(work)
    null = os.open("/dev/null", os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.dup2(result_w, 3)
    os.dup2(setup_w, 4)
    status_fd = 4
    os.closerange(5, 1 << 16)  # the control pipe and everything else of the worker
    resource.setrlimit(resource.RLIMIT_CPU, (spec["cpu_s"], spec["cpu_s"] + 1))
    resource.setrlimit(resource.RLIMIT_FSIZE, (spec["file_bytes"], spec["file_bytes"]))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    os.environ.clear()
    os.environ.update(spec["env"], HOME=work, TMPDIR=work)
    os.write(4, b"ok")
    os.close(4)
    status_fd = None
    _harness.run_spec(dict(spec, run_as_uid=None), 3)  # runs the cases, exits
  except BaseException as e:  # noqa: BLE001
    if status_fd is not None:
      try:
        os.write(status_fd, f"{type(e).__name__}: {e}".encode()[:500])
      except OSError:
        pass
  os._exit(1)


def run_one(spec, n):
  uid = spec["run_as_uid"]
  work = f"/tmp/w{n}"
  log_path = f"{CONTROL}/log{n}"
  log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
  result_r, result_w = os.pipe()
  setup_r, setup_w = os.pipe()
  t0 = time.monotonic()
  pid = os.fork()
  if pid == 0:
    _child(spec, work, log_fd, result_w, setup_w)
  os.close(result_w)
  os.close(setup_w)
  os.close(log_fd)
  setup = b""
  while select.select([setup_r], [], [], 10)[0]:
    chunk = os.read(setup_r, 1024)
    if not chunk:
      break
    setup += chunk
  os.close(setup_r)
  if setup != b"ok":
    _kill_and_clean(uid)
    os.waitpid(pid, 0)
    os.close(result_r)
    os.unlink(log_path)
    raise RuntimeError(f"the program's process could not be set up: {setup.decode(errors='replace')}")
  buf, timed_out, cap = b"", False, spec["result_cap"]
  deadline = t0 + spec["timeout_s"]
  while True:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
      timed_out = True
      break
    ready, _, _ = select.select([result_r], [], [], min(remaining, 0.5))
    if ready:
      chunk = os.read(result_r, 1 << 16)
      if not chunk:
        break  # every writer closed
      buf += chunk
      if len(buf) > cap:
        break
    elif os.waitpid(pid, os.WNOHANG)[0]:
      pid = None
      break
  status = None
  if pid is not None and not timed_out:  # let it report its own exit status
    end = time.monotonic() + 2
    while time.monotonic() < end:
      got, st = os.waitpid(pid, os.WNOHANG)
      if got:
        status, pid = st, None
        break
      time.sleep(0.002)
  _kill_and_clean(uid)
  if pid is not None:
    status = os.waitpid(pid, 0)[1]
  os.close(result_r)
  size = os.path.getsize(log_path)
  with open(log_path, "rb") as f:
    f.seek(max(0, size - 2000))
    tail = f.read().decode("utf-8", "replace")
  os.unlink(log_path)
  code = 0 if status is None else os.waitstatus_to_exitcode(status)
  return dict(buf=buf.decode("utf-8", "replace"), returncode=code, timed_out=timed_out, log_size=size,
              log_tail=tail)


def main():
  os.makedirs(CONTROL, mode=0o700, exist_ok=True)
  out = os.fdopen(os.dup(1), "w")
  for n, line in enumerate(sys.stdin):
    try:
      reply = run_one(json.loads(line), n)
    except Exception as e:  # noqa: BLE001 - the worker's own failure: the host restarts it
      reply = dict(error=f"{type(e).__name__}: {e}")
    out.write(json.dumps(reply) + "\n")
    out.flush()
    if "error" in reply:
      return


if __name__ == "__main__":
  main()
