"""Watch a Multiverse generation's branches grow side by side in the terminal.

    multiverse serve &                      # the shipped tiny model on 127.0.0.1:8000
    python examples/stream_branches.py "Count down by 3 from r 59, s 75, t 64, u 87, v 72, w 89 as far as it goes. What is the sum of the ends?"

Uses the official ``openai`` client (``pip install openai``) with ``stream=True`` and reads the
``multiverse`` events of the chunks (docs/streaming.md): one column per path of the block being
decoded, redrawn after every chunk; at the end, the canonical text the plain stream delivered.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import textwrap

from openai import OpenAI

from multiverse.format.prompts import user_prompt


def draw(header: str, columns: dict[str, str], done: set[str], height: int) -> None:
    width = shutil.get_terminal_size((120, 40)).columns
    names = list(columns)[-8:]
    col = max(12, width // max(1, len(names)) - 1)
    wrapped = {n: textwrap.wrap(columns[n].replace("\n", " ").strip(), col - 1) or [""] for n in names}
    out = ["\x1b[H\x1b[2J", header[: width - 1]]
    out.append(" ".join(f"{('path ' + n + (' (done)' if n in done else '')):<{col}}"[:col] for n in names))
    for row in range(height):
        cells = []
        for n in names:
            lines = wrapped[n][-height:]
            cells.append(f"{lines[row] if row < len(lines) else '':<{col}}")
        out.append(" ".join(cells))
    sys.stdout.write("\n".join(out) + "\n")
    sys.stdout.flush()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("question")
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    p.add_argument("--api-key", default=os.environ.get("MULTIVERSE_API_KEY", "none"))
    p.add_argument("--max-tokens", type=int, default=600)
    p.add_argument("--height", type=int, default=12, help="rows per column")
    args = p.parse_args()

    client = OpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=0)
    stream = client.chat.completions.create(
        model="multiverse", messages=[{"role": "user", "content": user_prompt(args.question)}],
        temperature=0, max_tokens=args.max_tokens, stream=True,
    )  # fmt: skip
    text, columns, done, blocks = "", {}, set(), 0
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        events = ((chunk.model_extra or {}).get("multiverse") or {}).get("events", [])
        for e in events:
            if e["type"] == "fork":
                columns = {name: "" for name in e["paths"]} if not e["branch"] else {**columns, **{n: "" for n in e["paths"]}}
                done, blocks = set(), blocks + 1
            elif e["type"] == "delta":
                columns[e["branch"]] = columns.get(e["branch"], "") + e["text"]
            elif e["type"] == "path_end":
                done.add(e["branch"])
        if columns:
            draw(f"block {blocks - 1}: {len(done)}/{len(columns)} paths done; streamed {len(text)} characters",
                 columns, done, args.height)  # fmt: skip
    print("\n--- final text ---\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
