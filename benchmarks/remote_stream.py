"""Stream granularity of ``multiverse serve --base-url`` against the local server.

Starts a real ``multiverse serve`` on the shipped tiny model (uvicorn on 127.0.0.1) and a
``serve --base-url`` front over it, both in this process, and streams ``--problems`` held-out
countdown problems (greedy, the ones the model forks on, asked as ``multiverse eval`` asks them)
from each, one at a time. Per problem: the chunks that carry text, the chunks that carry any
branch event, the generated tokens, and whether the streamed text equals the non-streamed one.
Prints a line per problem and one JSON object on the last line (medians).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def stream(url: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    import httpx

    with httpx.stream(
        "POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=600
    ) as r:
        r.raise_for_status()
        lines = [x[6:] for x in r.iter_lines() if x.startswith("data: ")]
    return [json.loads(x) for x in lines[:-1]]


def counts(chunks: list[dict[str, Any]]) -> tuple[int, int, str]:
    texts = [c["choices"][0]["text"] for c in chunks if c["choices"]]
    events = sum(1 for c in chunks if (c.get("multiverse") or {}).get("events"))
    return sum(1 for t in texts if t), events, "".join(texts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--problems", type=int, default=5)
    args = ap.parse_args()

    import httpx
    from _serving import serve_app

    from multiverse.cli.demo_model import demo_problems
    from multiverse.engine.llm import LLM
    from multiverse.eval.datasets import synthetic_tasks_for
    from multiverse.format.prompts import chat_prompt
    from multiverse.locations import find_model
    from multiverse.remote import RemoteLLM
    from multiverse.server.app import ServerConfig, create_app
    from multiverse.server.remote_app import create_remote_app

    llm = LLM(str(find_model()), num_kv_slots=16384)
    problems = demo_problems(args.problems, synthetic_tasks_for(find_model()).tasks)
    app = create_app(llm, "tiny", ServerConfig())
    rows = []
    try:
        with serve_app(app) as local:
            front_app = create_remote_app(RemoteLLM(local), "front", ServerConfig())
            with serve_app(front_app) as front:
                for p in problems:
                    body = {
                        "prompt": chat_prompt(llm.tokenizer, p.question),
                        "temperature": 0,
                        "max_tokens": 1024,
                    }
                    asked = {**body, "return_token_ids": True}
                    resp = httpx.post(f"{front}/v1/completions", json=asked, timeout=600)
                    whole = resp.json()["choices"][0]
                    tokens = len(whole["token_ids"])  # of all paths (and the stop token)
                    row = {"blocks": whole["multiverse"]["blocks"], "tokens": tokens}
                    for name, url in (("local", local), ("front", front)):
                        text_chunks, event_chunks, text = counts(stream(url, body))
                        row[name] = {"text_chunks": text_chunks, "event_chunks": event_chunks,
                                     "equal": text == whole["text"]}  # fmt: skip
                    rows.append(row)
                    print(json.dumps(row))
    finally:
        app.state.engine.close()
    med = {f"{w}_{k}": statistics.median(r[w][k] for r in rows) for w in ("local", "front")
           for k in ("text_chunks", "event_chunks")}  # fmt: skip
    med.update(tokens=statistics.median(r["tokens"] for r in rows), problems=len(rows),
               forked=sum(1 for r in rows if r["blocks"]),
               all_equal=all(r[w]["equal"] for r in rows for w in ("local", "front")))  # fmt: skip
    print(json.dumps(med))


if __name__ == "__main__":
    main()
