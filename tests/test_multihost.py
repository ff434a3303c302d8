"""Several JAX processes on this machine (gloo collectives), as on several hosts:
the helpers and a shrinking sampler batch, one iteration of the tiny ReST^EM run on
2 processes x 4 devices against 1 process x 8 devices, and resume after kill -9 of
one process and then of all.

Both runs start from the same SFT checkpoint (the tiny run's).  From there the
summaries are equal exactly: sampling and verification do not depend on how
rows are spread over processes, and the few M-step steps stay far from any
greedy tie.  (The 200-step SFT itself is not compared: its gradient all-reduce
sums 8 partial gradients in another order under gloo, the parameters differ
by ~1e-8 after two steps, and Adam grows that over 200 steps into a different
model.)
"""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT, subprocess_env

EPS32 = float(np.finfo(np.float32).eps)

# with test_restem on one pytest-xdist worker: both use the session's tiny run
pytestmark = pytest.mark.xdist_group("tiny_run")
LAUNCH = os.path.join(ROOT, "scripts", "local_multihost.sh")
TINY = os.path.join(ROOT, "gin", "restem_arith_tiny.gin")


def _bindings(run_dir, base):
  # the given model is the start: no SFT on human data (human_split ''); one iteration
  # (a second would spread its rows and gather them the same way again)
  return [f"--gin.RUN_DIR='{run_dir}'", f"--gin.RestemConfig.base_checkpoint='{base}'",
          "--gin.RestemConfig.human_split=''", "--gin.RestemConfig.num_iterations=1",
          "--gin.mstep/TrainConfig.checkpoint_every=4"]  # saves mid-M-step to resume from


def _launch(run_dir, base, **kw):
  env = dict(subprocess_env(), PYTHON=sys.executable)
  return subprocess.Popen(["bash", LAUNCH, "2", TINY, *_bindings(run_dir, base)], cwd=ROOT, env=env,
                          start_new_session=True, **kw)


def _summary(run_dir):
  with open(os.path.join(run_dir, "summary.json")) as f:
    s = json.load(f)
  s.pop("wall_time_s")
  s.pop("time_split_s")
  if "best_checkpoint" in s:  # the same checkpoint, under each run's own folder
    s["best_checkpoint"] = os.path.relpath(s["best_checkpoint"], run_dir)
  return s


@pytest.fixture(scope="session")
def base(uninterrupted):
  return os.path.join(uninterrupted[0], "sft", "train")


# session-scoped: pytest-xdist interleaves this module's tests with test_restem's on one
# worker (the group), and a module-scoped reference run would be made again each time
@pytest.fixture(scope="session")
def one_process(base, tmp_path_factory):
  """The reference: 1 process x 8 devices."""
  run_dir = str(tmp_path_factory.mktemp("one") / "run")
  r = subprocess.run([sys.executable, "-m", "restem_jax.main", f"--gin_file={TINY}", *_bindings(run_dir, base)],
                     cwd=ROOT, env=subprocess_env(8), capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  return run_dir


HELPERS = """
import json, sys
import numpy as np
from restem_jax import multihost, partitioning
multihost.initialize(sys.argv[1], 2, int(sys.argv[2]))
import jax
mesh = partitioning.make_mesh((-1, 1, 1))
x = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
g = multihost.global_array(x, partitioning.sharding_for(mesh, ("batch", None), x.shape))
doubled = multihost.to_host(jax.jit(lambda a: a * 2)(g))
print(json.dumps(dict(
    devices=jax.device_count(), local=jax.local_device_count(), doubled_ok=bool((doubled == 2 * x).all()),
    split=multihost.split_map(lambda xs: [[v, jax.process_index()] for v in xs], list(range(7))),
    gathered=multihost.allgather_json({"p": jax.process_index(), "text": "é" * jax.process_index()}))))
# a shrinking sampler batch, its rows spread over both processes (SAMPLE, below)
from flax import linen as nn
from restem_jax import model, sampling
cfg = model.ModelConfig(**SAMPLE["cfg"])
shardings = partitioning.logical_shardings(jax.eval_shape(lambda k: model.init_params(cfg, k), jax.random.key(0)), mesh)
params = jax.jit(lambda k: nn.unbox(model.init_params(cfg, k)), out_shardings=nn.unbox(shardings))(jax.random.key(0))
with jax.set_mesh(mesh):
  out = sampling.sample(cfg, params, SAMPLE["prompts"], sampling.SamplingConfig(**SAMPLE["sc"]), mesh=mesh,
                        **SAMPLE["kw"])
print(json.dumps(dict(tokens=out.tokens.tolist(), lengths=out.lengths.tolist(), computed=out.computed)))
"""
SAMPLE = dict(cfg=dict(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64),
              prompts=[[3, 4, 5], [6, 7], [8, 9, 10, 11], [12], [13, 14], [15, 16, 17], [18], [19, 20]],
              sc=dict(num_samples=4, max_new_tokens=40, temperature=1.0), kw=dict(eos_id=9, rng=7, batch_size=8))
HELPERS = f"SAMPLE = {SAMPLE!r}\n" + HELPERS


def test_helpers_on_two_processes():
  port = 20000 + os.getpid() % 20000
  env = dict(subprocess_env(4), JAX_PLATFORMS="cpu")
  procs = [subprocess.Popen([sys.executable, "-c", HELPERS, f"127.0.0.1:{port}", str(i)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  got = [json.loads(out.strip().splitlines()[-2]) for out, _ in outs]
  assert got[0] == got[1]  # every host ends with the same values
  g = got[0]
  assert (g["devices"], g["local"], g["doubled_ok"]) == (8, 4, True)
  # item i was computed by process i % 2, and comes back in order
  assert g["split"] == [[i, i % 2] for i in range(7)]
  assert g["gathered"] == [{"p": 0, "text": ""}, {"p": 1, "text": "é"}]
  # the shrinking batch: every host laid out the same smaller batches, and the samples are
  # those of one device (each row draws its own row of the batch's random numbers)
  sampled = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
  assert sampled[0] == sampled[1]
  import jax
  from flax import linen as nn
  from restem_jax import model, sampling
  cfg = model.ModelConfig(**SAMPLE["cfg"])
  params = nn.unbox(model.init_params(cfg, jax.random.key(0)))
  one = sampling.sample(cfg, params, SAMPLE["prompts"], sampling.SamplingConfig(**SAMPLE["sc"]), **SAMPLE["kw"])
  np.testing.assert_array_equal(np.asarray(sampled[0]["tokens"]), one.tokens)
  np.testing.assert_array_equal(np.asarray(sampled[0]["lengths"]), one.lengths)
  lengths = one.lengths.ravel()
  assert lengths.min() < lengths.max() and sampled[0]["computed"] < len(lengths) * lengths.max()  # it shrank


def test_two_processes_give_the_one_process_summary(base, one_process, tmp_path):
  run_dir = str(tmp_path / "run")
  p = _launch(run_dir, base, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  out, _ = p.communicate(timeout=900)
  assert p.returncode == 0, out[-3000:]
  assert _summary(run_dir) == _summary(one_process)
  # written once, by process 0: the log has the one-process run's rows (training
  # losses equal to float rounding: the gradient all-reduce sums in another order)
  with open(os.path.join(run_dir, "metrics.jsonl")) as f, open(os.path.join(one_process, "metrics.jsonl")) as g:
    got, want = [json.loads(x) for x in f], [json.loads(x) for x in g]
  assert [(r["stage"], r.get("step"), sorted(r)) for r in got] == \
      [(r["stage"], r.get("step"), sorted(r)) for r in want]
  for a, b in zip(got, want):
    for k in set(a) - {"time", "steps_per_s"}:
      # float32 losses / norms: gloo sums the 8 partial gradients in another order, and the
      # M-step's few Adam steps carry that on: 1024 eps of the value (1e-6 for one that is ~0)
      want_k = pytest.approx(b[k], rel=1024 * EPS32, abs=1e-6) if isinstance(b[k], float) else b[k]
      assert a[k] == want_k, (a["stage"], k)
  with open(os.path.join(run_dir, "iter_1", "kept.jsonl")) as f, \
      open(os.path.join(one_process, "iter_1", "kept.jsonl")) as g:
    assert f.read() == g.read()
  assert out.count("best iteration (by validation)") == 1  # the report is printed by process 0 only


def _python_pids(run_dir):
  """The run's python processes: {process_id: pid}."""
  pids = {}
  for d in os.listdir("/proc"):
    if not d.isdigit():
      continue
    try:
      with open(f"/proc/{d}/cmdline", "rb") as f:
        args = f.read().decode(errors="replace").split("\0")
    except OSError:
      continue
    if "restem_jax.main" in args and f"--gin.RUN_DIR='{run_dir}'" in args:
      pids[int(next(a for a in args if a.startswith("--process_id=")).split("=")[1])] = int(d)
  return pids


def _kill_when(run_dir, base, ready, which, timeout=600):
  """Starts the 2-process run, and when ready() kills `which` process ids with SIGKILL."""
  launcher = _launch(run_dir, base, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  t0 = time.time()
  try:
    while time.time() - t0 < timeout:
      if ready():
        pids = _python_pids(run_dir)
        assert sorted(pids) == [0, 1], pids
        for i in which:
          os.kill(pids[i], signal.SIGKILL)
        if which == (0, 1):
          os.kill(launcher.pid, signal.SIGKILL)
        launcher.wait(timeout=120)  # the launcher stops the survivors
        return launcher.returncode
      if launcher.poll() is not None:
        return None
      time.sleep(0.02)
  finally:
    if launcher.poll() is None:
      os.killpg(launcher.pid, signal.SIGKILL)
      launcher.wait()
  return None


def test_two_processes_resume_after_kill_9(base, one_process, tmp_path):
  run_dir = str(tmp_path / "run")
  batches = os.path.join(run_dir, "iter_1", "rollouts")
  kept = os.path.join(run_dir, "iter_1", "kept.jsonl")

  def in_e_step():
    return os.path.exists(os.path.join(batches, "batch_00001.npz")) and not os.path.exists(kept)
  rc = _kill_when(run_dir, base, in_e_step, which=(1,))
  assert rc not in (None, 0), "the run ended before the E-step could be interrupted"
  assert not _python_pids(run_dir), "a process outlived the one that was killed"
  assert not os.path.exists(kept)
  ckpts = os.path.join(run_dir, "iter_1", "train", "checkpoints")

  def in_m_step():
    return os.path.isdir(ckpts) and any(d.isdigit() and int(d) >= 2 for d in os.listdir(ckpts))
  rc = _kill_when(run_dir, base, in_m_step, which=(0, 1))
  assert rc is not None, "the run ended before the M-step could be interrupted"
  assert not os.path.exists(os.path.join(run_dir, "iter_1", "eval.json"))
  p = _launch(run_dir, base, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  out, _ = p.communicate(timeout=900)
  assert p.returncode == 0, out[-3000:]
  assert _summary(run_dir) == _summary(one_process)
  from restem_jax import rollouts
  files = sorted(f for f in os.listdir(batches) if f.endswith(".npz"))
  ids = np.concatenate([rollouts.load(os.path.join(batches, f)).problem_ids for f in files]).tolist()
  assert ids == [f"arith/pool/{i}" for i in range(192)]  # every problem once: none lost or duplicated
