"""Answer extraction and grading: math equivalence, multiple choice, exact match.

``grade(prediction_text, reference, kind)`` takes a model's whole output (reasoning included)
and a reference answer:

  - ``"math"``: the extracted answer and the reference are equal as mathematical objects:
    ``\\boxed{294}``, ``294`` and ``294.0`` match; ``\\frac{1}{2}``, ``1/2`` and ``0.5`` match.
    Checked by, in order, normalised string equality, ``math-verify`` (the ``eval`` extra,
    imported lazily), and a small exact-arithmetic fallback for numbers, fractions and simple
    LaTeX (used when ``math-verify`` is missing or cannot parse the text).
  - ``"choice"``: the chosen letter (``B``, ``(B)``, ``\\boxed{B}``, ``\\text{(B)}``) equals
    the reference letter, case-insensitively.
  - ``"exact"``: the extracted answer equals the reference after trimming whitespace, ``$``
    and a trailing period (synthetic tasks with integer answers).

:func:`extract_answer` looks, in this order, for the last non-empty ``\\boxed{...}`` (nested
braces handled), the last ``the final answer is ...`` and the last ``Answer: ...`` line, first
in the text after the last ``</Think>`` (any casing) and then in the whole text; a text that
is nothing but a short answer (``294.0``) is its own answer. Real outputs
are sometimes lower-cased after ``</Think>``; every pattern is case-insensitive.

Invariant: grading never raises on model output; unparseable text grades False.
"""

from __future__ import annotations

import re
import threading
from fractions import Fraction

KINDS = ("math", "choice", "exact")

_THINK_END_RE = re.compile(r"</think>", re.IGNORECASE)
_CHAT_MARKER_RE = re.compile(r"<\|(?:im_end|im_start|endoftext|eot_id|end_of_text)\|>")
_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\s*(\{)?", re.IGNORECASE)
_FINAL_RE = re.compile(r"final answer is\s*[:：]?\s*(.*)", re.IGNORECASE)
_ANSWER_RE = re.compile(r"(?:^|\n)[ \t*#]*(?:final )?answer[ \t*]*[:：][ \t*]*(.*)", re.IGNORECASE)


# ----------------------------------------------------------------------------- extraction


def boxed_contents(text: str) -> list[str]:
    """Contents of every ``\\boxed{...}`` / ``\\fbox{...}`` in order (nested braces kept;
    ``\\boxed 5`` without braces gives ``"5"``; an unclosed brace takes the rest of the text)."""
    out: list[str] = []
    for m in _BOXED_RE.finditer(text):
        if m.group(1) is None:
            bare = re.match(r"\s*([^\s$]+)", text[m.end() :])
            if bare:
                out.append(bare.group(1))
            continue
        depth, i = 1, m.end()
        while i < len(text) and depth:
            if text[i] == "\\" and i + 1 < len(text):
                i += 2
                continue
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        end = i - 1 if depth == 0 else i
        out.append(text[m.end() : end])
    return out


def _clean(answer: str) -> str:
    """Trim wrappers that never carry meaning: whitespace, ``$``, ``\\( \\)``, ``\\[ \\]``,
    bold markers, a trailing period."""
    s = answer.strip()
    for _ in range(3):
        before = s
        s = s.strip().strip("*").strip()
        if s.startswith("$") and s.endswith("$") and len(s) >= 2:
            s = s.strip("$")
        for a, b in (("\\(", "\\)"), ("\\[", "\\]")):
            if s.startswith(a) and s.endswith(b):
                s = s[len(a) : -len(b)]
        s = s.rstrip(".").rstrip()
        if s == before:
            break
    return s


def _line_answer(pattern: re.Pattern[str], text: str) -> str | None:
    matches = list(pattern.finditer(text))
    for m in reversed(matches):
        rest = m.group(1)
        if not rest.strip():
            # "Final Answer:" on its own line: the answer is on the next non-empty line
            tail = text[m.end() :].lstrip("\n")
            rest = tail.split("\n", 1)[0] if tail else ""
        boxed = [b for b in boxed_contents(rest) if b.strip()]
        candidate = _clean(boxed[-1] if boxed else rest)
        if candidate:
            return candidate
    return None


def _candidates(text: str) -> tuple[str | None, str | None, str | None]:
    """(last boxed, last "final answer is", last "Answer:" line) found in ``text``."""
    boxed = [b for b in boxed_contents(text) if _clean(b)]
    return (
        _clean(boxed[-1]) if boxed else None,
        _line_answer(_FINAL_RE, text),
        _line_answer(_ANSWER_RE, text),
    )


def _is_short(answer: str | None) -> bool:
    return answer is not None and len(answer) <= 80


def _is_bare_answer(text: str) -> bool:
    """A short single line with no English word (4+ letters not part of a LaTeX command)."""
    s = text.strip()
    return (
        0 < len(s) <= 64 and "\n" not in s and re.search(r"(?<![\\a-zA-Z])[a-zA-Z]{4,}", s) is None
    )


def extract_answer(text: str) -> str | None:
    """The final answer written in ``text``, or None when there is none (e.g. truncated).

    Text that is itself a bare answer (``"294.0"``, ``"\\frac{1}{2}"``) is its own answer.
    Chat markers a decoder left in (``<|im_end|>``, ``<|endoftext|>``) end a line.
    """
    text = _CHAT_MARKER_RE.sub("\n", text)
    ends = list(_THINK_END_RE.finditer(text))
    tail = _candidates(text[ends[-1].end() :]) if ends else (None, None, None)
    whole = _candidates(text)
    # A "final answer is" / "Answer:" line that is prose (a truncated write-up, over 80
    # characters) yields to a boxed answer found in the reasoning; it is a last resort.
    short = [x if _is_short(x) else None for x in (tail[1], tail[2], whole[1], whole[2])]
    order = [tail[0], short[0], short[1], whole[0], short[2], short[3], *tail[1:], *whole[1:]]
    found = next((x for x in order if x), None)
    if found is None and _is_bare_answer(text):
        found = _clean(text) or None
    return found


# ----------------------------------------------------------------------------- math


def _normalize(s: str) -> str:
    s = _clean(s)
    s = re.sub(r"(?<=\d)\s*\\(?:text|mbox)\{\s*[a-zA-Z ]+\}(\^[23]|\^\{[23]\})?$", "", s)  # units
    s = re.sub(r"\\(?:text|mathrm|textbf|mbox)\{([^{}]*)\}", r"\1", s)
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    s = re.sub(r"\\left|\\right|\\!|\\,|\\;|\\ ", "", s)
    s = s.replace("^\\circ", "").replace("^{\\circ}", "").replace("°", "")
    return re.sub(r"\s+", "", s).lower()


def _math_verify(prediction: str, reference: str) -> bool | None:
    """math-verify's verdict, or None when it is unavailable or parses nothing."""
    try:
        from math_verify import parse, verify
    except ImportError:
        return None
    # math-verify's timeouts use SIGALRM, which only works in the main thread
    limit = 5 if threading.current_thread() is threading.main_thread() else None
    try:
        gold = parse("\\boxed{" + reference + "}", parsing_timeout=limit)
        pred = parse("\\boxed{" + prediction + "}", parsing_timeout=limit)
        if not gold or not pred:
            return None
        return bool(verify(gold, pred, timeout_seconds=limit))
    except Exception:  # noqa: BLE001 - third-party parser on arbitrary model text
        return None


def to_number(text: str) -> Fraction | None:
    """Exact value of a plain number, fraction or simple LaTeX fraction; None otherwise.

    Handles ``42``, ``-3.50``, ``1,234``, ``3/4``, ``\\frac{3}{4}``, ``\\dfrac34``, ``-\\frac{1}{2}``,
    mixed numbers ``1\\frac{4}{5}``, degrees, ``\\text{...}`` units (``204\\text{ minutes}``).
    """
    s = _normalize(text)
    s = re.sub(r"(?<=\d),(?=\d{3}\b)", "", s)
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"^([a-z]+|\\[a-z]+)\s*=", "", s)  # "x=5"
    m = re.fullmatch(r"([-+]?)(\d*)\\frac\{(-?[\d.]+)\}\{(-?[\d.]+)\}", s)
    try:
        if m:
            sign, whole, num, den = m.groups()
            value = Fraction(num) / Fraction(den) + (Fraction(whole) if whole else 0)
            return -value if sign == "-" else value
        m = re.fullmatch(r"([-+]?[\d.]+)/([-+]?[\d.]+)", s)
        if m:
            return Fraction(m.group(1)) / Fraction(m.group(2))
        m = re.fullmatch(r"([-+]?(?:\d+(?:\.\d*)?|\.\d+))", s)
        if m:
            return Fraction(m.group(1))
    except (ValueError, ZeroDivisionError):
        return None
    return None


def math_equal(prediction: str, reference: str) -> bool:
    """True iff two answer strings denote the same mathematical object.

    A reference that is an option letter (``\\text{(C)}``) matches the same letter chosen.
    """
    if _normalize(prediction) == _normalize(reference):
        return True
    letter = _letter(reference, loose=False)
    if letter is not None and len(_normalize(reference)) <= 3:
        return _letter(prediction, loose=True) == letter
    a, b = to_number(prediction), to_number(reference)
    if a is not None and b is not None:
        return a == b or abs(float(a) - float(b)) <= 1e-9 * max(1.0, abs(float(b)))
    verdict = _math_verify(prediction, reference)
    return bool(verdict)


# ----------------------------------------------------------------------------- choice


def _letter(s: str, loose: bool) -> str | None:
    s = _clean(re.sub(r"\\(?:text|mathrm|textbf|mbox)\{([^{}]*)\}", r"\1", s))
    m = re.fullmatch(r"\(?\s*([A-Ja-j])\s*\)?", s)
    if m:
        return m.group(1).upper()
    if not loose:
        return None
    m = re.match(r"\(?([A-J])(?:\)|[.:]|\s|$)", s) or re.search(r"\(([A-Ja-j])\)", s)
    m = m or re.search(r"\b([A-J])\b", s)
    return m.group(1).upper() if m else None


def extract_choice(text: str) -> str | None:
    """The chosen option letter (upper case): from the extracted answer (``B``, ``(b)``,
    ``\\boxed{B}``, ``\\text{(B)}``, ``B) 10 eV``, ``option (C)``), else from ``text`` when it
    is nothing but a letter."""
    answer = extract_answer(text)
    if answer:
        return _letter(answer, loose=True)
    return _letter(text, loose=False)


# ----------------------------------------------------------------------------- public


def grade(prediction_text: str, reference: str, kind: str = "math") -> bool:
    """Whether the answer in ``prediction_text`` (a whole output) matches ``reference``."""
    if kind not in KINDS:
        raise ValueError(f"unknown grading kind {kind!r}: choose one of {KINDS}")
    reference = str(reference)
    if kind == "choice":
        ref = extract_choice(reference) or _clean(reference).upper()
        return extract_choice(prediction_text) == ref
    answer = extract_answer(prediction_text)
    if answer is None:
        return False
    if kind == "exact":
        return _clean(answer) == _clean(reference)
    return math_equal(answer, reference)
