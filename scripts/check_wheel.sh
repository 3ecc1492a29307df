#!/usr/bin/env bash
# Build the wheel, install it in a fresh virtualenv (no source tree on the path) and run what a
# user runs first: `multiverse --help`, `multiverse inspect` on a text file, `multiverse demo`
# and the README's Python snippets. Usage: scripts/check_wheel.sh [PYTHON]
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
PY="${1:-python3}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
t0=$(date +%s)
"$PY" -m pip wheel -q --no-deps -w "$WORK/dist" "$REPO"
rm -rf "$REPO/build"                         # setuptools' scratch folder
WHEEL="$(ls "$WORK"/dist/multiverse-*.whl)"
echo "built $(basename "$WHEEL") ($(du -h "$WHEEL" | cut -f1))"
"$PY" -m venv "$WORK/venv"
"$WORK/venv/bin/pip" install -q --upgrade pip
"$WORK/venv/bin/pip" install -q torch==2.13.0
"$WORK/venv/bin/pip" install -q "$WHEEL[demo]"
t1=$(date +%s)
echo "installed in a fresh venv in $((t1 - t0)) s"
mkdir "$WORK/run" && cd "$WORK/run"          # no checkout here: imports come from the wheel
ln -s "$REPO/models" models                  # the README's `LLM("models/multiverse-tiny")`
export OMP_NUM_THREADS=1
"$WORK/venv/bin/python" -c "import multiverse, sys; assert 'site-packages' in multiverse.__file__, multiverse.__file__"
"$WORK/venv/bin/multiverse" --help >/dev/null
printf '<Think>\nLet us add.\n</Think>\n\nAnswer: 2\n' > plain.txt
"$WORK/venv/bin/multiverse" inspect plain.txt | tail -n 2
"$WORK/venv/bin/multiverse" demo --problems 1 | tail -n 3
"$WORK/venv/bin/python" - "$REPO/README.md" <<'PYEOF'
import re, sys
readme = open(sys.argv[1], encoding="utf-8").read()
blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
for i, code in enumerate(blocks, 1):
    exec(compile(code, f"README python block {i}", "exec"), {})
print(f"README: {len(blocks)} Python blocks ran")
PYEOF
echo "{\"wheel\": \"$(basename "$WHEEL")\", \"install_s\": $((t1 - t0)), \"total_s\": $(( $(date +%s) - t0 ))}"
