"""One Markdown table from several ``multiverse curate eval`` runs (each DIR's ``eval.json``):
a row per curating LLM x ground truth, to choose a curating LLM.

    .venv/bin/python scripts/curate_eval_table.py eval-a/ eval-b/ ...
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from multiverse.curate import evaluate


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    rows = []
    for d in argv:
        res = json.loads((Path(d) / "eval.json").read_text(encoding="utf-8"))
        if not res["accepted"]:  # eval.json written before "-" (null) meant no accepted record
            res["parallel_degree"]["curated_accepted"] = None
        name = "synthetic tasks" if res.get("truth") == "tasks" else Path(res.get("truth", d)).name
        rows.append(evaluate.row(res, name))
    print("\n".join([evaluate.HEADER, *rows]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
