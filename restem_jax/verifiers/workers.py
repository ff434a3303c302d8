"""One long-lived helper process per verifying thread (the code sandbox's warm
worker, the sympy worker): made on first use, replaced when it dies, when the
caller asks for a fresh one (after a timeout) or in a forked child, and closed
at exit by the process that made it."""
from __future__ import annotations

import atexit
import os
import threading
from typing import Callable, Generic, TypeVar

W = TypeVar("W")


class PerThread(Generic[W]):
  """`get()` returns this thread's worker, made by `make()`; `alive(w)` says whether it can
  still answer, `close(w)` ends it."""

  def __init__(self, make: Callable[[], W], alive: Callable[[W], bool], close: Callable[[W], None]):
    self._make, self._alive, self._close = make, alive, close
    self._local = threading.local()
    self._all: list[tuple[W, int]] = []  # (worker, the pid that made it)
    self._lock = threading.Lock()
    atexit.register(self.close_all)

  def get(self, fresh: bool = False) -> W:
    w, pid = getattr(self._local, "worker", None), getattr(self._local, "pid", None)
    if w is not None and (fresh or pid != os.getpid() or not self._alive(w)):
      if pid == os.getpid():  # a forked child leaves its parent's workers alone
        self._close(w)
        with self._lock:
          self._all[:] = [(x, p) for x, p in self._all if x is not w]
      w = None
    if w is None:
      w = self._make()
      self._local.worker, self._local.pid = w, os.getpid()
      with self._lock:
        live, dead = [], []
        for x, p in self._all:  # each worker asked once whether it is alive
          (live if self._alive(x) else dead).append((x, p))
        self._all[:] = live + [(w, os.getpid())]
      for x, p in dead:  # another thread's worker that died: its files go too
        if p == os.getpid():
          self._close(x)
    return w

  def close_all(self) -> None:
    with self._lock:
      for w, pid in self._all:
        if pid == os.getpid():
          self._close(w)
      self._all.clear()
