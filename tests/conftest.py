"""Every test sees 8 simulated CPU devices (set before jax is imported)."""
import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# One persistent compilation cache for the session, shared by the subprocess runs
# (the tiny ReST^EM / reward runs compile the same programs again and again):
# an executable loaded from it is the one XLA compiled, so no result changes.
# Fresh per session (nothing stale from another jax version), removed at exit.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  import atexit
  import shutil
  import tempfile
  _cache = tempfile.mkdtemp(prefix="restem_jax_test_cache_")
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ.update(JAX_COMPILATION_CACHE_DIR=_cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402

import numpy as np  # noqa: E402


def pytest_configure(config):
  """The suite runs with `--dist loadgroup` (Makefile): each xdist_group stays on one
  worker, which builds its shared fixtures (a tiny run, the SmolLM2 run, the TFDS
  data) once.  pytest-xdist marks a group by renaming node ids, which pytest 9.2
  ignores: the groups would split silently, their fixtures built on every worker."""
  if getattr(config.option, "dist", "no") != "loadgroup":
    return
  import xdist
  from packaging.version import Version
  if Version(pytest.__version__) >= Version("9.2") and Version(xdist.__version__) <= Version("3.8.0"):
    raise pytest.UsageError(
        f"pytest {pytest.__version__} ignores the test groups of pytest-xdist {xdist.__version__} "
        "(--dist loadgroup): grouped tests would spread over the workers and build their shared "
        "fixtures on each; pip install 'pytest<9.2' (setup.py's test extras pin it)")


# The longest groups first (Makefile: --no-loadscope-reorder keeps this order), so the
# many short modules fill in around them on the other worker: xdist's own order (by
# test count) would leave a long one-test group (the notebook) for the end.
LONGEST_GROUPS = ("tiny_run", "real_model", "reward", "notebook", "tfds", "extend")


def pytest_collection_modifyitems(config, items):
  rank = {g: i for i, g in enumerate(LONGEST_GROUPS)}

  def group(item):
    mark = item.get_closest_marker("xdist_group")
    return rank.get(mark.args[0] if mark and mark.args else None, len(rank))
  items.sort(key=group)  # stable: each module keeps its order and stays in one piece


def assert_close(actual, desired, ulps: float, dtype=np.float32, err_msg: str = ""):
  """`actual` equals `desired` up to rounding, both computed in `dtype` along
  different paths (summation order, fusion, sharding, another library).

  The allowed error is `ulps` units of the dtype's machine epsilon, relative to
  each value, plus a floor of the same size relative to the largest |desired|:
  rounding errors of a sum scale with the terms summed, so an entry that
  cancels to near 0 gets the array's scale, not its own.  Each caller states
  why its `ulps` fits the computation; none comes from what passed on one
  machine (XLA picks its CPU kernels per machine)."""
  eps = float(np.finfo(dtype).eps) * ulps
  desired = np.asarray(desired, np.float64)
  scale = float(np.max(np.abs(desired[np.isfinite(desired)]), initial=0.0))
  np.testing.assert_allclose(np.asarray(actual, np.float64), desired, rtol=eps, atol=eps * scale,
                             err_msg=err_msg)


def assert_same_greedy(got, want, want_logits, ulps: float, dtype=np.float32):
  """Greedy tokens `got` equal the reference's `want` (whose logits at each step are
  want_logits[t]).  They may part only at a tie: where the reference's best logit and
  the logit of the token we chose are within `ulps` eps of the step's largest |logit|
  (rounding may break such a tie either way); after that the two follow different
  prefixes and are not compared."""
  got, want = [int(x) for x in got], [int(x) for x in want]
  assert len(got) == len(want), (len(got), len(want))
  for t, (a, b) in enumerate(zip(got, want)):
    if a != b:
      row = np.asarray(want_logits[t], np.float64)
      tol = float(np.finfo(dtype).eps) * ulps * np.max(np.abs(row))
      assert row[b] - row[a] <= tol, (f"token {t}: {a} instead of {b}, whose logit is higher by "
                                      f"{row[b] - row[a]:.3g} (> {tol:.3g}: not a tie)")
      return


def assert_greedy_like_transformers(theirs, cfg, params, prompt: list[int], ulps: float, n: int = 32):
  """`n` greedy tokens of ours after `prompt` (no EOS) are transformers model
  `theirs`'s, up to a tie (assert_same_greedy)."""
  import torch
  from restem_jax import sampling
  theirs.generation_config.eos_token_id = None
  theirs.generation_config.pad_token_id = 0
  with torch.no_grad():
    ref = theirs.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                          output_logits=True, return_dict_in_generate=True)
  ours = sampling.sample(cfg, params, [list(prompt)], sampling.SamplingConfig(max_new_tokens=n), eos_id=-1,
                         batch_size=1)
  assert_same_greedy(ours.tokens[0, 0], ref.sequences.numpy()[0, len(prompt):], [x[0].numpy() for x in ref.logits],
                     ulps)


SHARED_DATA = os.environ.get(
    "RESTEM_DATA_DIR",
    os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data"))


@pytest.fixture(scope="session")
def shared_data():
  if not os.path.isdir(SHARED_DATA):
    pytest.fail(f"shared data folder not found at {SHARED_DATA} (set RESTEM_DATA_DIR)")
  return SHARED_DATA


def make_bpe_vocab(folder):
  """A real byte-level BPE tokenizer (tokenizers), trained here on a little text."""
  import json
  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers, trainers
  from restem_jax import vocab
  tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "</s>", "<unk>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(["the answer is 42", "1+2=3 and 3*4=12", "```python\nprint(1)\n```"] * 50,
                          trainer)
  tok.save(os.path.join(folder, "tokenizer.json"))
  with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
    json.dump({"eos_token": "</s>"}, f)
  return vocab.HFTokenizerVocabulary(str(folder))


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def subprocess_env(devices: int = 1) -> dict:
  """The environment of a run started as a user starts it (`devices` CPU devices)."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}" if devices > 1 else ""
  env["PYTHONPATH"] = ROOT
  return env


@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory):
  """The tiny ReST^EM run as a user types it: a relative gin file and a relative
  run directory, from a working directory that is not the project's (orbax
  needs absolute paths).  (run_dir, summary)."""
  import json
  import subprocess
  cwd = tmp_path_factory.mktemp("tiny")
  cmd = [sys.executable, "-m", "restem_jax.main", "--gin_file=gin/restem_arith_tiny.gin",
         "--gin.RUN_DIR='runs/tiny'"]
  r = subprocess.run(cmd, cwd=cwd, env=subprocess_env(), capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  run_dir = str(cwd / "runs" / "tiny")
  with open(os.path.join(run_dir, "summary.json")) as f:
    return run_dir, json.load(f)
