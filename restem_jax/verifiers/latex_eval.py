"""A small, conservative numeric evaluator for LaTeX answers (a fast pre-check).

It evaluates the arithmetic subset of LaTeX that final answers mostly use
(numbers, + - * / ^, \\frac, \\sqrt, \\pi, e, implicit products, single-letter
variables, common functions) to a float, substituting fixed pseudo-random
values for variables.  Anything else gives None and the grader falls back to
sympy.  The grader uses it only to *reject* quickly (values differ) or to pick
which pairs deserve the symbolic check; it never accepts on its own.
"""
from __future__ import annotations

import math
import re
import zlib

_TOKEN = re.compile(r"\s*(\\[a-zA-Z]+|\d+\.\d*|\.\d+|\d+|[a-zA-Z]|[-+*/^(){}\[\]!,|])")
_FUNCS = {"sin": math.sin, "cos": math.cos, "tan": math.tan, "ln": math.log, "log": math.log10,
          "exp": math.exp, "arcsin": math.asin, "arccos": math.acos, "arctan": math.atan,
          "sec": lambda x: 1 / math.cos(x), "csc": lambda x: 1 / math.sin(x),
          "cot": lambda x: 1 / math.tan(x)}
_IGNORED = {"left", "right", "displaystyle", "!", ",", ";", ":"}
_MAX_TOKENS = 400


class _Fail(Exception):
  pass


def _var_value(name: str, seed: int) -> float:
  return 0.3 + (zlib.crc32(f"{name}:{seed}".encode()) % 10_007) / 10_007.0 * 1.4


class _Parser:
  def __init__(self, tokens, seed):
    self.t, self.i, self.seed = tokens, 0, seed

  def peek(self):
    return self.t[self.i] if self.i < len(self.t) else None

  def take(self, want=None):
    tok = self.peek()
    if tok is None or (want is not None and tok != want):
      raise _Fail
    self.i += 1
    return tok

  def expr(self):
    v = self.term()
    while self.peek() in ("+", "-"):
      v = v + self.term() if self.take() == "+" else v - self.term()
    return v

  def term(self):
    v = self.unary()
    while True:
      tok = self.peek()
      if tok in ("*", "\\cdot", "\\times"):
        self.take(); v *= self.unary()
      elif tok in ("/", "\\div"):
        self.take(); d = self.unary()
        if d == 0:
          raise _Fail
        v /= d
      elif tok is not None and tok not in ("+", "-", ")", "}", "]", "^", ",", "!", "|"):
        v *= self.power()  # implicit product: 2x, 2\pi, (a)(b)
      else:
        return v

  def unary(self):
    if self.peek() == "-":
      self.take(); return -self.unary()
    if self.peek() == "+":
      self.take(); return self.unary()
    return self.power()

  def power(self):
    base = self.atom()
    while self.peek() == "!":
      self.take()
      if base != int(base) or not 0 <= base <= 20:
        raise _Fail
      base = float(math.factorial(int(base)))
    if self.peek() == "^":
      self.take()
      exp = self.unary() if self.peek() == "-" else self.atom()
      if abs(exp) > 64 or (base < 0 and exp != int(exp)) or (base == 0 and exp < 0):
        raise _Fail
      return float(base ** exp)
    return base

  def group(self):
    """{...} or a single-token argument."""
    if self.peek() == "{":
      self.take(); v = self.expr(); self.take("}"); return v
    return self.atom()

  def atom(self):
    tok = self.take()
    if tok in ("(", "[", "{"):
      v = self.expr(); self.take({"(": ")", "[": "]", "{": "}"}[tok]); return v
    if tok == "|":
      v = self.expr(); self.take("|"); return abs(v)
    if re.fullmatch(r"\d+\.\d*|\.\d+|\d+", tok):
      return float(tok)
    if tok.startswith("\\"):
      name = tok[1:]
      if name in ("frac", "dfrac", "tfrac"):
        num = self.group(); den = self.group()
        if den == 0:
          raise _Fail
        return num / den
      if name == "sqrt":
        root = 2.0
        if self.peek() == "[":
          self.take(); root = self.expr(); self.take("]")
        v = self.group()
        if v < 0 or root == 0:
          raise _Fail
        return v ** (1.0 / root)
      if name == "pi":
        return math.pi
      if name in _FUNCS:
        arg = self.power()
        try:
          return float(_FUNCS[name](arg))
        except (ValueError, ZeroDivisionError, OverflowError):
          raise _Fail from None
      raise _Fail
    if re.fullmatch(r"[a-zA-Z]", tok):
      return math.e if tok == "e" else _var_value(tok, self.seed)
    raise _Fail


def evaluate(latex: str, seed: int = 0) -> float | None:
  """Value of `latex` (variables substituted by seed-dependent values) or None."""
  if len(latex) > 2000:
    return None
  s = re.sub(r"\\[dt]?frac(\d)(\d)", r"\\frac{\1}{\2}", latex)  # \frac12
  s = re.sub(r"\\sqrt(\d)", r"\\sqrt{\1}", s)  # \sqrt2
  for cmd in _IGNORED:
    s = s.replace("\\" + cmd, " ")
  tokens = []
  pos = 0
  while pos < len(s):
    m = _TOKEN.match(s, pos)
    if not m:
      if s[pos:].strip() == "":
        break
      return None
    tokens.append(m.group(1))
    pos = m.end()
    if len(tokens) > _MAX_TOKENS:
      return None
  if not tokens:
    return None
  p = _Parser(tokens, seed)
  try:
    v = p.expr()
    if p.i != len(tokens) or not math.isfinite(v):
      return None
    return v
  except (_Fail, OverflowError, ZeroDivisionError, ValueError, RecursionError, TypeError):
    return None


def fingerprint(latex: str) -> tuple[float, ...] | None:
  """Values at three variable assignments (None if not evaluable)."""
  out = []
  for seed in (1, 2, 3):
    v = evaluate(latex, seed)
    if v is None:
      return None
    out.append(v)
  return tuple(out)
