"""``python -m multiverse_vllm overrides MODEL_DIR`` | ``transfer-config [MAX_TOKENS]``: the
``--hf-overrides`` and ``--kv-transfer-config`` values (JSON) for a vLLM with both hooks."""

from __future__ import annotations

import json
import sys

from multiverse_vllm.config import hf_overrides, transfer_config


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "overrides":
        print(json.dumps(hf_overrides(argv[1])))
    elif argv and argv[0] == "transfer-config" and len(argv) <= 2:
        print(json.dumps(transfer_config(int(argv[1]) if len(argv) == 2 else None)))
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
