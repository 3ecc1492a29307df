"""The curator's prompts: versioned text files in ``multiverse/curate/prompts/`` (package data).

Each file starts with ``version: N``; :func:`version` is ``name-vN-<sha256 of the file, 8
hex>``, so editing a prompt changes every journal key that uses it (old replies are not
reused for a new prompt). A request is ``[system: the prompt, user: "INPUT JSON:\\n" +
payload]``; the repair call appends the bad reply and ``repair.txt`` quoting the validator's
messages, followed by the same ``INPUT JSON``.
"""

from __future__ import annotations

import hashlib
import json
from functools import cache
from importlib.resources import files
from typing import Any

STEPS = ("summarise", "parallelise", "mapreduce")
INPUT_MARK = "INPUT JSON:\n"


@cache
def _read(name: str) -> tuple[str, str]:
    raw = (files("multiverse.curate") / "prompts" / f"{name}.txt").read_text(encoding="utf-8")
    head, _, body = raw.partition("\n")
    if not head.startswith("version:"):
        raise ValueError(f"prompt {name}.txt must start with 'version: N'")
    digest = hashlib.sha256(raw.encode()).hexdigest()[:8]
    return f"{name}-v{head.split(':', 1)[1].strip()}-{digest}", body.strip()


def version(name: str) -> str:
    return _read(name)[0]


def text(name: str) -> str:
    return _read(name)[1]


def versions() -> dict[str, str]:
    return {name: version(name) for name in (*STEPS, "repair")}


def messages(step: str, payload: dict[str, Any]) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": text(step)},
        {"role": "user", "content": INPUT_MARK + json.dumps(payload, ensure_ascii=False)},
    ]


def repair(previous: list[dict[str, str]], reply: str, errors: list[str]) -> list[dict[str, str]]:
    quoted = "\n".join(f"- {e}" for e in errors)
    return [
        *previous,
        {"role": "assistant", "content": reply},
        {"role": "user", "content": text("repair").replace("{errors}", quoted) + "\n\n" + previous[1]["content"]},
    ]
