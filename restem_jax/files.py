"""Paths and files every stage shares: a path made absolute, atomic writes (a reader
never sees half a file; a process killed mid-write leaves the old one), JSON."""
from __future__ import annotations

import contextlib
import json
import os

from restem_jax import multihost


def absolute(path: str) -> str:
  """A local path made absolute (orbax refuses relative ones); a URI such as
  gs://bucket/run passes through untouched; "" stays ""."""
  if not path or "://" in str(path):
    return path
  return os.path.abspath(os.path.expanduser(os.fspath(path)))


@contextlib.contextmanager
def atomic(path: str, mode: str = "w"):
  """Opens a temporary file beside `path` and, when the block ends without error, moves it
  over `path` (flushed to disk first).  The caller decides which process writes."""
  tmp = f"{path}.tmp{os.getpid()}"
  try:
    with open(tmp, mode) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_json(path: str, obj) -> None:
  """Atomically writes `path`; with several processes only process 0 writes."""
  if not multihost.is_writer():
    return
  with atomic(path) as f:
    json.dump(obj, f, indent=1)


def read_json(path: str):
  with open(path) as f:
    return json.load(f)
