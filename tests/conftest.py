"""Every test sees 8 simulated CPU devices (set before jax is imported)."""
import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402

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
