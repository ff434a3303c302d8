"""Math answer grading: extract the final answer, decide equivalence, reward.

`is_equivalent` is staged, cheapest first:
  1. string normalisation (\\dfrac, \\left, \\text{units}, degrees, $, %, "x =",
     thousands separators, spaces, \\sqrt2, \\frac12) and comparison;
  2. numbers (integers, decimals, fractions, mixed numbers, scientific
     notation): exact, except that a decimal may be the other number rounded
     to 6 places (`numbers_equal`); "30,150" is 30150 or the list 30, 150,
     whichever the other answer is;
  3. structure (tuples and intervals with their brackets, sets and bare
     comma lists as multisets, matrices), element by element;
  4. a numeric fingerprint (latex_eval) that rejects clearly different
     expressions at once, then sympy (`simplify(a - b) == 0`) in a worker
     process killed at `timeout_s` to confirm the rest.
No input raises: anything unparseable is simply "not equivalent".
"""
from __future__ import annotations

import functools
import math
import re
from fractions import Fraction

from restem_jax.verifiers import latex_eval, symbolic

MAX_ANSWER_CHARS = 1000  # longer answers are compared as normalised strings only
MAX_RESPONSE_CHARS = 200_000


# ----------------------------------------------------------------------------- extraction

def _last_braced(text: str, commands=("\\boxed", "\\fbox")) -> str | None:
  """Contents of the last \\boxed{...} / \\fbox{...} (nested braces), or None."""
  best = -1
  for c in commands:
    best = max(best, text.rfind(c))
  if best < 0:
    return None
  i = best
  while i < len(text) and text[i] != "{" and not text[i].isspace():
    i += 1
  if i < len(text) and text[i].isspace():  # "\boxed 5"
    m = re.match(r"\s+([^\s$]+)", text[i:])
    return m.group(1).rstrip(".") if m else None
  if i >= len(text):
    return None
  depth, start = 0, i + 1
  for j in range(i, len(text)):
    if text[j] == "{":
      depth += 1
    elif text[j] == "}":
      depth -= 1
      if depth == 0:
        return text[start:j]
  return None  # truncated: braces never closed


def extract_answer(text: str) -> str | None:
  """Final answer of a solution: last \\boxed{} / \\fbox{}, GSM8K "#### x",
  PRM800K "# Answer" line, "The answer is x", or a final "A: x" line."""
  if not isinstance(text, str) or not text:
    return None
  text = text[-MAX_RESPONSE_CHARS:]
  if "\\boxed" in text or "\\fbox" in text:
    ans = _last_braced(text)
    if ans is not None and ans.strip():
      return ans.strip()
  m = list(re.finditer(r"^####[ \t]*(\S.*?)\s*$", text, re.M))
  if m:  # "#### The final answer is 75" (instruct models) -> 75
    return _answer_phrase(m[-1].group(1)) or m[-1].group(1)
  m = re.search(r"^#\s*Answer\s*\n+\s*(.+?)\s*$", text, re.M)
  if m:
    return m.group(1)
  ans = _answer_phrase(text)
  if ans is not None:
    return ans
  m = list(re.finditer(r"(?:^|[\s,:(])\$?(-?\d[\d,]*(?:\.\d+)?)\$?\s+is the (?:final |correct )?answer\b",
                       text, re.M))
  if m:  # "12 is the answer." / "Therefore, 115 is the answer to the problem."
    return m[-1].group(1)
  m = re.search(r"(?:^|\n)A:\s*(.+?)\s*$", text)
  if m:
    return m.group(1)
  return None


_ANSWER_IS = re.compile(r"[Tt]he (?:final )?answer is[:\s]*\$?(.+?)\$?\s*(?:\.\s*$|$|\.\s+)", re.M)
_TRAILING_NUMBER = re.compile(r"=\s*\$?(-?\d[\d,]*(?:\.\d+)?)\$?\s*$")


def _answer_phrase(text: str) -> str | None:
  """The last "The (final) answer is X"; "X = ... = 200" gives its final number."""
  m = list(_ANSWER_IS.finditer(text))
  if not m:
    return None
  ans = m[-1].group(1).strip()
  tail = _TRAILING_NUMBER.search(ans)
  return tail.group(1) if tail and not ans.lstrip("-").replace(",", "").replace(".", "").isdigit() else ans


# ----------------------------------------------------------------------------- normalisation

_UNIT_WORDS = (r"(?:units?|square\s+units|sq\.?\s*units|degrees?|cm|centimeters?|meters?|m|km|"
               r"inches|inch|in|feet|foot|ft|yards?|miles?|mph|hours?|hrs?|minutes?|mins?|seconds?|secs?|"
               r"days?|weeks?|years?|dollars?|cents?|pounds?|ounces?|grams?|kg|liters?|"
               r"gallons?|people|students|ways|points|pieces|marbles|cookies|apples)")
_UNIT = r"(?:(?:square|sq\.?|cubic|cu\.?)\s+)?" + _UNIT_WORDS + r"\.?"


def _strip_text_units(s: str) -> str:
  # a number followed by words in \text{...} at the end is a number with a unit:
  # 5\text{ min}, 12\text{ square inches}, \frac{1}{2}\text{ hours}, 8\text{ cm}^2
  s = re.sub(r"(?<=[\d}.])\s*\\(?:text|textbf|mbox|mathrm)\{\s*[a-zA-Z][a-zA-Z.\s-]*\}(\^\{?\d\}?)?\s*\.?\s*$",
             "", s)
  s = re.sub(r"(?<=\S)\s*\\(?:text|textbf|mbox|mathrm)\{\s*" + _UNIT + r"\s*\}(\^\{?\d\}?)?", "", s)
  s = re.sub(r"(?<=[\d}])\s+" + _UNIT + r"(\^\{?\d\}?)?\s*$", "", s)
  return s


def _fix_fracs(s: str) -> str:
  s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
  s = re.sub(r"\\frac\{([^{}]*)\}(\d)", r"\\frac{\1}{\2}", s)
  s = re.sub(r"\\frac(\d)\{", r"\\frac{\1}{", s)
  s = re.sub(r"\\sqrt(\d+|[a-zA-Z])", r"\\sqrt{\1}", s)
  return s


@functools.lru_cache(maxsize=65536)
def normalize(s: str) -> str:
  """Canonical string form of an answer (string stage of the grader)."""
  s = str(s).strip()
  s = s.replace("\n", " ").replace("~", " ")
  s = re.sub(r"(?<!\\)\\[!,;:]", "", s)  # thin spaces (not a row break "\\")
  s = re.sub(r"(?<!\\)\\ ", " ", s)
  s = re.sub(r"\\(?:displaystyle|mathbf|mathrm|boldsymbol)\s*", "", s)
  s = re.sub(r"\\[dt]frac", r"\\frac", s)
  s = s.replace("\\left", "").replace("\\right", "").replace("\\bigl", "").replace("\\bigr", "")
  s = re.sub(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|°|\\degree", "", s)
  s = s.replace("\\$", "").replace("$", "")
  s = s.replace("\\%", "").replace("%", "")
  s = _strip_text_units(s)
  s = re.sub(r"\\(?:text|textbf|mbox|mathrm|operatorname)\{([^{}]*)\}", r"\1", s)
  s = s.replace("{,}", "").replace("\\infty", "\\infty ").replace("\\cdot", "\\cdot ")
  # "1,000,000" and "12,345.5" are numbers; "30,150" may be one number or a list of
  # two and is decided against the other answer (_equivalent_normalized)
  s = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", s) if re.fullmatch(
      r"-?\d{1,3}(,\d{3}){2,}(\.\d+)?|-?\d{1,3}(,\d{3})+\.\d+", s.replace(" ", "")) else s
  # "x = 3", "k=5": a short variable name on the left
  m = re.fullmatch(r"\s*[a-zA-Z](?:_\{?\w+\}?)?\s*=\s*(.+)", s)
  if m and "=" not in m.group(1):
    s = m.group(1)
  s = re.sub(r"\s+", "", s)
  s = _fix_fracs(s)
  s = re.sub(r"(?<![\d}])\.(\d)", r"0.\1", s)  # .5 -> 0.5
  s = re.sub(r"^\{(.*)\}$", r"\1", s) if s.count("{") == 1 else s
  s = s.rstrip(".")
  return s


# ----------------------------------------------------------------------------- numbers

_NUM = r"-?(?:\d+\.?\d*|\.\d+)"


def parse_number(s: str) -> Fraction | float | None:
  """A plain number in normalised form, or None."""
  if len(s) > 100:
    return None
  neg = s.startswith("-")
  body = s[1:] if neg else s
  sign = -1 if neg else 1
  try:
    if re.fullmatch(r"\d+", body):
      return sign * Fraction(int(body))
    if re.fullmatch(r"\d+\.\d*|\.\d+", body):
      return sign * Fraction(body)
    m = re.fullmatch(r"\\frac\{(-?\d+(?:\.\d+)?)\}\{(-?\d+(?:\.\d+)?)\}", body) or \
        re.fullmatch(r"(\d+(?:\.\d+)?)/(\d+(?:\.\d+)?)", body)
    if m:
      den = Fraction(m.group(2))
      return None if den == 0 else sign * Fraction(m.group(1)) / den
    m = re.fullmatch(r"(\d+)\\frac\{(\d+)\}\{(\d+)\}", body)  # mixed number 2\frac{1}{2}
    if m and int(m.group(3)) != 0 and int(m.group(2)) < int(m.group(3)):
      return sign * (int(m.group(1)) + Fraction(int(m.group(2)), int(m.group(3))))
    m = re.fullmatch(r"(\d+\.?\d*)(?:\\times|\\cdot|\*|x)10\^\{?(-?\d+)\}?", body) or \
        re.fullmatch(r"(\d+\.?\d*)[eE]([-+]?\d+)", body)
    if m and abs(int(m.group(2))) <= 400:
      return sign * Fraction(m.group(1)) * Fraction(10) ** int(m.group(2))
  except (ValueError, ZeroDivisionError, OverflowError):
    return None
  return None


def numbers_equal(a: Fraction, b: Fraction, approximate: bool = False) -> bool:
  """Written numbers compare exactly (1000001 is not 1000000, 1000001/7 is not
  1000000/7).  Only where one side is a decimal (`approximate`) may it stand for
  the other rounded: equal when both round to the same 6 decimal places and
  agree to 5 parts in a million (0.3333333 is 1/3; 0.333 is not; nor is
  1.5e-8 equal to 1.6e-8)."""
  if a == b:
    return True
  return approximate and round(a, 6) == round(b, 6) and abs(a - b) <= Fraction(5, 10**6) * max(abs(a), abs(b))


# ----------------------------------------------------------------------------- structure

_OPEN, _CLOSE = "([{", ")]}"


def split_top(s: str, sep: str = ",") -> list[str]:
  """Split at `sep` outside brackets (\\{ \\} count as brackets)."""
  parts, depth, cur, i = [], 0, [], 0
  while i < len(s):
    c = s[i]
    if s.startswith("\\{", i) or s.startswith("\\}", i):
      depth += 1 if s[i + 1] == "{" else -1
      cur.append(s[i:i + 2]); i += 2; continue
    if c in _OPEN:
      depth += 1
    elif c in _CLOSE:
      depth -= 1
    if depth == 0 and s.startswith(sep, i):
      parts.append("".join(cur)); cur = []; i += len(sep); continue
    cur.append(c); i += 1
  parts.append("".join(cur))
  return parts


def _matching_close(s: str) -> bool:
  """s[0] opens a bracket that closes exactly at s[-1]."""
  depth = 0
  for i, c in enumerate(s):
    if c in _OPEN:
      depth += 1
    elif c in _CLOSE:
      depth -= 1
      if depth == 0 and i != len(s) - 1:
        return False
  return depth == 0


def parse_structure(s: str):
  """(kind, brackets, elements) for tuples/intervals/sets/lists/matrices, else None."""
  m = re.fullmatch(r"\\begin\{[pbBvV]?matrix\}(.*)\\end\{[pbBvV]?matrix\}", s)
  if m:
    rows = [r for r in m.group(1).split("\\\\") if r != ""]
    return ("matrix", "", [tuple(r.split("&")) for r in rows])
  if "\\cup" in s:
    parts = split_top(s, "\\cup")
    if len(parts) > 1:
      return ("union", "", parts)
  if s.count("\\pm") == 1 and "," not in s:  # 3\pm2\sqrt{2}: both solutions
    return ("list", "", [s.replace("\\pm", "+"), s.replace("\\pm", "-")])
  if s.startswith("\\{") and s.endswith("\\}"):
    return ("set", "{}", split_top(s[2:-2]))
  if len(s) >= 2 and s[0] in "([" and s[-1] in ")]" and _matching_close(s):
    parts = split_top(s[1:-1])
    if len(parts) > 1:
      return ("tuple", s[0] + s[-1], parts)
  parts = split_top(s)
  if len(parts) > 1 and all(parts):
    return ("list", "", parts)
  return None


def _multiset_equal(xs, ys, eq) -> bool:
  if len(xs) != len(ys):
    return False
  remaining = list(ys)
  for x in xs:
    for j, y in enumerate(remaining):
      if eq(x, y):
        del remaining[j]
        break
    else:
      return False
  return True


def _structures_equal(a, b, eq) -> bool:
  (ka, ba, xa), (kb, bb, xb) = a, b
  if ka == "list" and kb == "set" or ka == "set" and kb == "list":
    return _multiset_equal(xa, xb, eq)
  if ka != kb:
    return False
  if ka == "matrix":
    return len(xa) == len(xb) and all(
        len(r) == len(q) and all(eq(u, v) for u, v in zip(r, q)) for r, q in zip(xa, xb))
  if ka == "tuple":
    return ba == bb and len(xa) == len(xb) and all(eq(u, v) for u, v in zip(xa, xb))
  return _multiset_equal(xa, xb, eq)  # set, list, union


# ----------------------------------------------------------------------------- equivalence

def _fingerprints_close(fa, fb) -> bool:
  return all(math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-12) for x, y in zip(fa, fb))


_THOUSANDS = re.compile(r"-?\d{1,3}(,\d{3})+")
_BASE_NOTATION = re.compile(r"[0-9A-Za-z]+_\{?\d+\}?")


def _equivalent_normalized(a: str, b: str, timeout_s: float, depth: int = 0) -> bool:
  if a == b:
    return True
  if not a or not b or depth > 4:
    return False
  if _BASE_NOTATION.fullmatch(a) or _BASE_NOTATION.fullmatch(b):  # 28_9: a numeral in base 9
    a, b = a.replace("{", "").replace("}", ""), b.replace("{", "").replace("}", "")
    # the same digits, with or without the base subscript, are the same numeral
    return a == b or a.split("_")[0] == b.split("_")[0] and ("_" not in a or "_" not in b)
  ta, tb = _THOUSANDS.fullmatch(a), _THOUSANDS.fullmatch(b)
  if (ta or tb) and _equivalent_normalized(a.replace(",", "") if ta else a, b.replace(",", "") if tb else b,
                                           timeout_s, depth + 1):
    return True  # "30,150" as the number 30150; below, as the list 30, 150
  na, nb = parse_number(a), parse_number(b)
  if na is not None and nb is not None:
    return numbers_equal(na, nb, approximate="." in a or "." in b)
  sa, sb = parse_structure(a), parse_structure(b)
  if sa or sb:
    if sa and sb:
      return _structures_equal(sa, sb, lambda x, y: _equivalent_normalized(
          normalize(x), normalize(y), timeout_s, depth + 1))
    return False
  if max(len(a), len(b)) > MAX_ANSWER_CHARS:
    return False
  fa, fb = latex_eval.fingerprint(a), latex_eval.fingerprint(b)
  if fa is not None and fb is not None and not _fingerprints_close(fa, fb):
    return False  # clearly different values
  return symbolic.symbolic_equal(a, b, timeout_s)


@functools.lru_cache(maxsize=65536)
def _cached_equivalent(given: str, gold: str, timeout_s: float) -> bool:
  a, b = normalize(given), normalize(gold)
  return _equivalent_normalized(a, b, timeout_s)


def is_equivalent(given: str | None, gold: str | None, timeout_s: float = 1.0) -> bool:
  """True if `given` and `gold` are the same mathematical answer."""
  if given is None or gold is None:
    return False
  try:
    given, gold = str(given), str(gold)
    if len(given) > MAX_RESPONSE_CHARS or given.count("{") > 500:
      return normalize(given[:MAX_RESPONSE_CHARS]) == normalize(gold)
    return _cached_equivalent(given, gold, float(timeout_s))
  except (RecursionError, ValueError, OverflowError, MemoryError, TypeError):
    return False


def grade(response: str, gold: str, timeout_s: float = 1.0) -> float:
  """1.0 if the response's final answer equals `gold`, else 0.0."""
  return 1.0 if is_equivalent(extract_answer(response), gold, timeout_s) else 0.0
