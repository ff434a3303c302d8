"""Code sandbox: red-team programs, verdicts, HumanEval and APPS on the real data."""
import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

from restem_jax import verifiers
from restem_jax.verifiers import code, sandbox

STDIN_TEST = {"inputs": ["1 2\n", "3 4\n"], "outputs": ["3\n", "7\n"]}
ADD = "a, b = map(int, input().split())\nprint(a + b)\n"


def test_bubblewrap_is_used():
  assert sandbox.bwrap_available(), "bwrap missing or unusable: `make sandbox` installs it"


def test_sandbox_imports_numpy_from_a_virtualenv_under_tmp(tmp_path):
  """A venv under /tmp (a fresh clone there): the sandbox's private /tmp must not
  hide its site-packages, and the start-up probe must import numpy inside."""
  import numpy
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  venv = tempfile.mkdtemp(prefix="restem_venv_", dir="/tmp")
  try:
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    py = os.path.join(venv, "bin", "python")
    site_dir = subprocess.run([py, "-c", "import site; print(site.getsitepackages()[0])"],
                              check=True, capture_output=True, text=True).stdout.strip()
    assert site_dir.startswith("/tmp/")
    src = os.path.dirname(os.path.dirname(numpy.__file__))
    for name in os.listdir(src):  # numpy and its bundled libraries only
      if name == "numpy" or name.startswith("numpy.libs") or name.startswith("numpy-"):
        copy = shutil.copytree if os.path.isdir(os.path.join(src, name)) else shutil.copy
        copy(os.path.join(src, name), os.path.join(site_dir, name))
    script = ("import sys; sys.path.insert(0, sys.argv[1])\n"
              "from restem_jax.verifiers import code, sandbox\n"
              "print('probed', sandbox.check_imports())\n"
              "v = code.run_tests('import numpy\\nprint(int(numpy.arange(4).sum()))', "
              "{'inputs': [''], 'outputs': ['6']})\n"
              "print('verdict', v.status, v.detail)\n")
    out = subprocess.run([py, "-c", script, root], capture_output=True, text=True, timeout=120,
                         env={"PATH": os.environ["PATH"]})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "probed ('numpy',)" in out.stdout, out.stdout
    assert "verdict passed" in out.stdout, out.stdout
  finally:
    shutil.rmtree(venv, ignore_errors=True)


def test_sandbox_probe_names_a_hidden_package(tmp_path, monkeypatch):
  """When the sandbox cannot see a package the host imports, the probe fails loudly."""
  pkg = tmp_path / "site"
  (pkg / "restem_probe_pkg").mkdir(parents=True)
  (pkg / "restem_probe_pkg" / "__init__.py").write_text("X = 1\n")
  monkeypatch.syspath_prepend(str(pkg))  # importable here, never mounted in the sandbox
  sandbox.check_imports.cache_clear()
  try:
    with pytest.raises(sandbox.SandboxSetupError, match="restem_probe_pkg"):
      sandbox.check_imports(("numpy", "restem_probe_pkg"))
    assert sandbox.check_imports() == ("numpy",)
  finally:
    sandbox.check_imports.cache_clear()


def test_stdin_and_call_based_verdicts():
  assert code.run_tests(ADD, STDIN_TEST).status == "passed"
  assert code.run_tests(ADD, json.dumps(STDIN_TEST)).passed  # APPS files store JSON strings
  v = code.run_tests("print(3)", STDIN_TEST)
  assert (v.status, v.passed_cases, v.total_cases) == ("wrong_answer", 1, 2)
  assert code.run_tests("print(3 +)", STDIN_TEST).status == "compile_error"
  call = {"fn_name": "double", "inputs": [[1], [2.5]], "outputs": [[2], [5.0]]}
  assert code.run_tests("def double(x):\n  return 2 * x", call).passed
  leet = {"fn_name": "twoSum", "inputs": [[[2, 7, 11], 9]], "outputs": [[0, 1]]}
  sol = "class Solution:\n  def twoSum(self, nums: List[int], t: int) -> List[int]:\n    return [0, 1]"
  assert code.run_tests(sol, leet).passed
  assert code.run_tests("print('3.0000001')\n", {"inputs": [""], "outputs": ["3"]}).passed
  assert code.run_tests("print(' 3 \\n\\n4 ')\n", {"inputs": [""], "outputs": ["3\n4"]}).passed


def test_bad_tests_are_named():
  with pytest.raises(ValueError, match="input_output: invalid JSON at line 1"):
    code.run_tests(ADD, "{inputs: [")
  with pytest.raises(ValueError, match="2 inputs but 1 outputs"):
    code.run_tests(ADD, {"inputs": ["1", "2"], "outputs": ["1"]})


def _canary(tmp_path):
  p = tmp_path / "canary.txt"
  p.write_text("keep me")
  return p


RED_TEAM = {
    "infinite_loop": ("while True:\n  pass\n", "timeout"),
    "ignores_sigterm": ("import signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                        "signal.signal(signal.SIGALRM, signal.SIG_IGN)\nwhile True:\n  pass\n", "timeout"),
    "fork_bomb": ("import os\nwhile True:\n  os.fork()\n", "runtime_error"),
    "huge_allocation": ("x = bytearray(8 * 1024 ** 3)\nprint(3)\n", "memory_limit"),
    "write_outside": ("open('{canary}', 'w').write('owned')\nprint(3)\n", "runtime_error"),
    "delete_files": ("import os\nos.remove('{canary}')\nprint(3)\n", "runtime_error"),
    "socket": ("import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
               "s.sendall(b'hi')\nprint(3)\n", "runtime_error"),
    "read_environment": ("import os\nprint(os.environ.get('RESTEM_SECRET', 'none'))\n", "wrong_answer"),
    "kill_parent": ("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n"
                    "os.kill({parent}, signal.SIGKILL)\nprint(3)\n", "runtime_error"),
    "exit_early": ("import os\nos._exit(0)\n", "runtime_error"),
    "stdout_flood": ("import sys\nwhile True:\n  sys.stdout.write('x' * 65536)\n", "output_limit"),
    "raw_fd_flood": ("import os\nwhile True:\n  os.write(1, b'x' * 65536)\n", "output_limit"),
    "daemon_thread": ("import threading, time\n"
                      "def spin():\n  while True: time.sleep(0.01)\n"
                      "threading.Thread(target=spin, daemon=True).start()\nprint(4)\n", "wrong_answer"),
    "segfault": ("import ctypes\nctypes.string_at(0)\n", "runtime_error"),
    "daemonize": ("import os, time\nif os.fork() == 0:\n  os.setsid()\n  if os.fork() == 0:\n"
                  "    time.sleep(60)\n  os._exit(0)\nprint(4)\n", "wrong_answer"),
    "deep_recursion": ("import sys\nsys.setrecursionlimit(10**9)\ndef f(n):\n  return f(n + 1)\nf(0)\n",
                       "runtime_error"),
}


def _our_processes():
  """{pid: (uid, state, name, cmdline)} of every process descended from this one.  A program
  cannot leave the sandbox's PID namespace, so whatever it leaves behind is among these;
  another pytest worker's sandboxes (running at the same time) are not."""
  procs, parent = {}, {}
  for d in filter(str.isdigit, os.listdir("/proc")):
    try:
      with open(f"/proc/{d}/status") as f:
        fields = dict(line.split(":", 1) for line in f.read().splitlines() if ":" in line)
      with open(f"/proc/{d}/cmdline", "rb") as f:
        cmd = f.read().decode(errors="replace").replace("\0", " ")
    except (OSError, ValueError):
      continue
    parent[int(d)] = int(fields.get("PPid", "0"))
    procs[int(d)] = (int(fields.get("Uid", "0").split()[0]), fields.get("State", "").strip(),
                     fields.get("Name", "").strip(), cmd)

  def ours(pid):
    while pid > 1:
      pid = parent.get(pid, 0)
      if pid == os.getpid():
        return True
    return False
  return {p: v for p, v in procs.items() if ours(p)}


def _program_processes():
  """Live processes of the sandbox's per-program uids (>= 100000) that this test started."""
  return [(p, uid, name) for p, (uid, state, name, _) in _our_processes().items()
          if uid >= 100_000 and not state.startswith("Z")]


@pytest.mark.parametrize("warm", [True, False], ids=["warm", "cold"])
@pytest.mark.parametrize("name", sorted(RED_TEAM))
def test_red_team(name, warm, tmp_path, monkeypatch):
  import socket as socket_mod
  monkeypatch.setenv("RESTEM_SECRET", "3")  # a leaked environment would print the right answer
  canary = _canary(tmp_path)
  server = socket_mod.socket()
  server.bind(("127.0.0.1", 0))
  server.listen(1)
  server.settimeout(0.2)
  program, want = RED_TEAM[name]
  program = program.format(canary=canary, port=server.getsockname()[1], parent=os.getpid())
  tests = {"inputs": [""], "outputs": ["3"]}
  t = time.time()
  v = code.run_tests(program, tests, limits=sandbox.Limits(timeout_s=6, case_timeout_s=2, warm=warm))
  assert not v.passed and v.status == want, v
  assert time.time() - t < 20
  assert canary.read_text() == "keep me"
  with pytest.raises(socket_mod.timeout):
    server.accept()  # nothing connected from the sandbox
  server.close()
  # no sandboxed process outlives its verdict (programs run as fresh uids >= 100000)
  leftover = [p for p, (_, state, _, cmd) in _our_processes().items()
              if "sandbox/.harness.py" in cmd and not state.startswith("Z")]
  assert leftover == [], leftover
  assert _program_processes() == []
  assert code.run_tests(ADD, STDIN_TEST).passed  # the caller carries on


LEAVE = ("import os\nfor p in ('/tmp/left.txt', '/dev/shm/left', 'left_here.txt'):\n"
         "  try:\n    open(p, 'w').write('x')\n  except OSError:\n    pass\nprint(3)\n")
LOOK = ("import glob, os\nleft = glob.glob('/tmp/left.txt') + glob.glob('/dev/shm/left') + "
        "glob.glob('/tmp/*/left_here.txt') + glob.glob('left_here.txt')\nprint(3 if not left else left)\n")


@pytest.mark.parametrize("warm", [True, False], ids=["warm", "cold"])
def test_a_program_finds_nothing_of_the_one_before(warm):
  limits = sandbox.Limits(timeout_s=6, case_timeout_s=2, warm=warm)
  tests = {"inputs": [""], "outputs": ["3"]}
  for _ in range(2):
    assert code.run_tests(LEAVE, tests, limits=limits).passed
    v = code.run_tests(LOOK, tests, limits=limits)
    assert v.passed, v


def test_a_broken_warm_sandbox_is_an_error_not_a_failing_program(monkeypatch):
  monkeypatch.setattr(sandbox, "_fresh_uid", lambda: -5)  # no such uid: the child's set-up fails
  with pytest.raises(RuntimeError, match="could not be set up"):
    code.run_tests(ADD, STDIN_TEST)
  monkeypatch.undo()
  assert code.run_tests(ADD, STDIN_TEST).passed  # a fresh worker carries on


def test_equal_always_true_object_cannot_pass():
  prog = ("class Liar:\n  def __eq__(self, other):\n    return True\n"
          "def solve(x):\n  return Liar()\n")
  v = code.run_tests(prog, {"fn_name": "solve", "inputs": [[1]], "outputs": [[42]]})
  assert v.status == "wrong_answer"


def test_exit_before_tests_is_failure():
  v = code.run_humaneval("import sys\ndef f(x):\n  return 0\nsys.exit(0)\n",
                         "def check(c):\n  assert c(1) == 2\n", "f")
  assert not v.passed
  v = code.run_tests("import sys\nsys.exit(0)\ndef f(x):\n  return x\n",
                     {"fn_name": "f", "inputs": [[1]], "outputs": [1]})
  assert not v.passed


def test_batch_runner_counts_and_survives_hostile_workers():
  problem = {"input_output": STDIN_TEST}
  records = [(problem, ADD), (problem, "while True: pass"), (problem, "print(3)"),
             (problem, "import os\nos.kill(os.getppid(), 9)"), (problem, ADD)]
  rewards, results, counts = verifiers.verify_batch(
      verifiers.AppsVerifier(timeout_s=4, case_timeout_s=1), records, workers=2)
  assert rewards.tolist() == [1.0, 0.0, 0.0, 0.0, 1.0]
  assert counts["passed"] == 2 and counts["timeout"] == 1 and counts["wrong_answer"] == 1


def _jsonl(path):
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rt") as f:
    return [json.loads(line) for line in f]


def test_humaneval_canonical_pass_and_stubs_fail(shared_data):
  rows = _jsonl(os.path.join(shared_data, "humaneval/HumanEval.jsonl.gz"))
  assert len(rows) == 164
  v = verifiers.HumanEvalVerifier()
  good, _, counts = verifiers.verify_batch(v, [(r, r["canonical_solution"]) for r in rows])
  assert good.sum() == 164, counts
  bad, _, _ = verifiers.verify_batch(v, [(r, "    pass\n") for r in rows])
  assert bad.sum() == 0


def _plain_passes(program, io_):
  """Reference run without any sandbox: one plain python process per test case."""
  fn = io_.get("fn_name")
  with tempfile.TemporaryDirectory() as d:
    for inp, out in zip(io_["inputs"], io_["outputs"]):
      if fn:
        src = (code.PRELUDE + program + "\nimport json, sys\n"
               f"_f = globals().get({fn!r}) or getattr(Solution(), {fn!r})\n"
               "print(json.dumps(_f(*json.loads(sys.stdin.read()))))\n")
        stdin = json.dumps(inp)
      else:
        src, stdin = code.PRELUDE + program, inp if isinstance(inp, str) else "\n".join(inp)
      try:
        r = subprocess.run([sys.executable, "-c", src], input=stdin, capture_output=True,
                           text=True, timeout=60, cwd=d)
      except subprocess.TimeoutExpired:
        return False
      if fn:
        try:
          ok = r.returncode == 0 and code.return_matches(json.loads(r.stdout.strip().splitlines()[-1]), out)
        except (ValueError, IndexError):
          ok = False
      else:
        ok = code.stdout_matches(r.stdout, out)
      if not ok:
        return False
  return True


def test_apps_sandbox_loses_no_correct_program(shared_data):
  problems = _jsonl(os.path.join(shared_data, "apps/apps_subset.jsonl"))
  records = [(p, s) for p in problems for s in p["solutions"]]
  rewards, results, counts = verifiers.verify_batch(
      verifiers.AppsVerifier(case_timeout_s=30), records)
  failed = [(p, s, r) for (p, s), r in zip(records, results) if r.reward == 0]
  lost = [(p["apps_split"], p["problem_id"], r.status, r.detail) for p, s, r in failed
          if _plain_passes(s, p["input_output"])]
  assert not lost, lost
  print(f"APPS: {int(rewards.sum())}/{len(records)} reference solutions pass in the sandbox; "
        f"failing ones also fail plainly: {counts}")
  # a problem's solution against the next problem's tests
  swapped = [(problems[(i + 1) % len(problems)], p["solutions"][0]) for i, p in enumerate(problems)]
  wrong, _, _ = verifiers.verify_batch(verifiers.AppsVerifier(case_timeout_s=2), swapped)
  assert wrong.sum() == 0


NO_BWRAP_SCRIPT = """
import sys, warnings
sys.path.insert(0, sys.argv[1])
from restem_jax import main, verifiers
from restem_jax.verifiers import code, sandbox
add, tests = sys.argv[2], {"inputs": ["1 2\\n", "3 4\\n"], "outputs": ["3\\n", "7\\n"]}
print("problem:", sandbox.bwrap_problem())
for what, call in [
    ("run_tests", lambda: code.run_tests(add, tests)),
    ("humaneval", lambda: code.run_humaneval("def f():\\n  return 1", "def check(c):\\n  assert c() == 1", "f")),
    ("verify_batch", lambda: verifiers.verify_batch(verifiers.AppsVerifier(), [({"input_output": tests}, add)] * 3)),
    ("main._task", lambda: main._task("humaneval", "", None)),
]:
  try:
    call()
    print(what, "ran")
  except sandbox.SandboxUnavailableError as e:
    print(what, "refused:", e)
with warnings.catch_warnings(record=True) as w:
  warnings.simplefilter("always")
  print("opt-in apps", code.run_tests(add, tests, allow_unisolated=True).status)
  print("opt-in limits", code.run_tests(add, tests, limits=sandbox.Limits(allow_unisolated=True)).status)
  task = main._task("humaneval", "", None, allow_unisolated=True)
  p = task.load("test")[0]
  print("opt-in humaneval", task.verifier(p, p["solution"]).status)
  net = "import socket\\ntry:\\n  socket.create_connection(('127.0.0.1', 9))\\n  print('open')\\nexcept OSError as e:\\n  print('blocked')"
  print("opt-in network", code.run_tests(net, {"inputs": [""], "outputs": ["blocked"]}, allow_unisolated=True).status)
  print("warned", any("allow_unisolated is set" in str(x.message) for x in w))
"""


def test_without_bubblewrap_untrusted_code_is_refused_unless_allowed(tmp_path, shared_data):
  """bwrap not installed (a PATH without it): every way in refuses with a message that says
  how to install it or opt in; Limits(allow_unisolated=True) (the verifiers' field, the
  entry points' gin binding) runs programs with rlimits, sockets blocked and a warning."""
  script = tmp_path / "no_bwrap.py"
  script.write_text(NO_BWRAP_SCRIPT)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {"PATH": str(tmp_path), "RESTEM_DATA_DIR": shared_data, "JAX_PLATFORMS": "cpu"}
  r = subprocess.run([sys.executable, str(script), root, ADD], capture_output=True, text=True,
                     timeout=300, env=env)
  assert r.returncode == 0, r.stderr[-3000:]
  out = r.stdout
  assert "problem: bwrap is not installed (not on PATH)" in out, out
  for what in ("run_tests", "humaneval", "verify_batch", "main._task"):
    line = next(l for l in out.splitlines() if l.startswith(what + " "))
    assert line.startswith(f"{what} refused: refusing to run model-written code"), line
    assert "apt-get install bubblewrap" in line and "allow_unisolated_code=True" in line, line
  for what in ("apps", "limits", "humaneval", "network"):
    assert f"opt-in {what} passed" in out, out
  assert "warned True" in out, out


def test_one_worker_per_thread_replaced_when_dead_or_fresh_and_closed_once():
  """verifiers.workers.PerThread, which the sandbox's warm workers and the sympy workers share."""
  import threading
  from restem_jax.verifiers import workers

  class W:
    def __init__(self):
      self.up = True
  closed = []
  pool = workers.PerThread(W, alive=lambda w: w.up, close=lambda w: closed.append(w))
  a = pool.get()
  assert pool.get() is a
  other = []
  t = threading.Thread(target=lambda: other.append(pool.get()))
  t.start()
  t.join()
  assert other[0] is not a  # its own worker
  a.up = False  # died: replaced, and the dead one closed
  b = pool.get()
  assert b is not a and closed == [a]
  c = pool.get(fresh=True)  # after a timeout: the hung one is closed, a new one made
  assert c is not b and closed == [a, b]
  pool.close_all()
  assert closed[2:] == [other[0], c] or closed[2:] == [c, other[0]]
  pool.close_all()
  assert len(closed) == 4  # each closed once
  # a worker whose thread ended and which then died is closed (its files removed) when
  # another thread makes a worker, not dropped
  t = threading.Thread(target=lambda: other.append(pool.get()))
  t.start()
  t.join()
  other[-1].up = False
  pool.get(fresh=True)
  assert closed[-1] is other[-1]
