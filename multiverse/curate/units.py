"""Numbered units of a sequential chain, and the normalisation they are cut from.

A *unit* is the smallest piece of the original chain the curator moves around: one line; a
line longer than ``max_chars`` is cut into sentences; a display-math block (``$$ ... $$``,
``\\[ ... \\]``) or a fenced code block (`````` ``` `````` / ``~~~``) is one unit however many
lines it has. Units are numbered from 1.

Normalisation (:func:`normalise`) is what the chain is compared in: the text inside
``<Think>`` ... ``</Think>`` when present (a chain that already carries Multiverse tags is
flattened first), ``\\r\\n`` -> ``\\n``, Unicode NFC, lines stripped (code-fence lines only
right-stripped), empty lines and cue lines (``Let's think in parallel.``) dropped.

Invariant (property-tested): ``join(split_units(normalise(c))) == normalise(c)`` for every
chain ``c``; each unit keeps the separator that preceded it (``"\\n"`` or the whitespace
between two sentences of one line), so joining is exact.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

from multiverse.format import grammar

MAX_CHARS = 300
"""Lines longer than this are cut into sentences."""

_FENCE_RE = re.compile(r"^(```|~~~)")
_SENTENCE_END_RE = re.compile(r"(?<=[.!?])(\s+)(?=\S)")
_THINK_RE = re.compile(r"<think>(.*?)(?:</think>|$)", re.IGNORECASE | re.DOTALL)


@dataclass(slots=True, frozen=True)
class Unit:
    """Unit ``index`` (1-based); ``sep`` is the text that preceded it (``""`` for unit 1)."""

    index: int
    text: str
    sep: str = "\n"


def _opens_fence(stripped: str) -> str | None:
    """The fence (```` ``` ```` or ``~~~``) a line opens, or None; a line that opens and closes a
    fence itself (```` ```x = 1``` ````) opens none."""
    m = _FENCE_RE.match(stripped)
    if not m or (len(stripped) >= 6 and stripped.endswith(m.group(1))):
        return None
    return m.group(1)


def normalise(chain: str) -> str:
    """The chain as the curator compares it (see the module docstring)."""
    text = unicodedata.normalize("NFC", chain.replace("\r\n", "\n").replace("\r", "\n"))
    if any(t.lower() in text.lower() for t in grammar.TAGS if t not in ("<Think>", "</Think>")):
        text = grammar.flatten(text)
    else:
        m = _THINK_RE.search(text)
        if m:
            text = m.group(1)
    lines: list[str] = []
    in_fence = ""
    for raw in text.split("\n"):
        stripped = raw.strip()
        if in_fence:
            lines.append(raw.rstrip())
            if stripped.startswith(in_fence):
                in_fence = ""
            continue
        if not stripped or grammar.is_cue(stripped):
            continue
        in_fence = _opens_fence(stripped) or ""
        lines.append(stripped)
    while lines and not lines[-1].strip():
        lines.pop()
    return "\n".join(lines)


def _display_end(line: str) -> str | None:
    """The closing delimiter a line opening display math waits for, or None."""
    if line.startswith("$$") and not (len(line) > 2 and line.endswith("$$")):
        return "$$"
    if line.startswith("\\[") and not line.endswith("\\]"):
        return "\\]"
    return None


def _sentences(line: str) -> list[tuple[str, str]]:
    """``(separator, sentence)`` pieces of one long line; never cuts inside inline ``$...$``."""
    pieces: list[tuple[str, str]] = []
    start, sep = 0, ""
    for m in _SENTENCE_END_RE.finditer(line):
        head = line[start : m.start()]
        if line[: m.start()].count("$") % 2:  # inside inline math
            continue
        pieces.append((sep, head))
        start, sep = m.end(), m.group(1)
    pieces.append((sep, line[start:]))
    return pieces


def split_units(text: str, max_chars: int = MAX_CHARS) -> list[Unit]:
    """Cut normalised ``text`` into numbered units (see the module docstring)."""
    lines = text.split("\n") if text else []
    pieces: list[tuple[str, str]] = []  # (sep, text)
    i = 0
    while i < len(lines):
        line = lines[i]
        sep = "\n" if pieces else ""
        stripped = line.strip()
        fence = _opens_fence(stripped)
        closing = fence or _display_end(stripped)
        if closing:
            j = i + 1
            while j < len(lines) and not lines[j].strip().endswith(closing) and not (
                fence and lines[j].strip().startswith(closing)
            ):
                j += 1
            j = min(j, len(lines) - 1)
            pieces.append((sep, "\n".join(lines[i : j + 1])))
            i = j + 1
            continue
        if len(line) > max_chars:
            parts = _sentences(line)
            pieces.append((sep, parts[0][1]))
            pieces.extend(parts[1:])
        else:
            pieces.append((sep, line))
        i += 1
    return [Unit(k + 1, t, s) for k, (s, t) in enumerate(pieces)]


def join(units: list[Unit]) -> str:
    """Inverse of :func:`split_units`: the normalised text the units were cut from."""
    return "".join(u.sep + u.text for u in units)


def numbered(units: list[Unit]) -> str:
    """The units as the LLM sees them: ``[k] text`` per unit (multi-line units indented)."""
    return "\n".join(f"[{u.index}] " + u.text.replace("\n", "\n    ") for u in units)
