#!/usr/bin/env bash
# The GPU check (scripts/gpu_check.py): every GPU code path in one prepared run.
#   bash scripts/gpu_check.sh --out gpu-report          # on a GPU machine (about 6 minutes on an H200)
#   bash scripts/gpu_check.sh --cpu --out /tmp/check    # tiny shapes on CPU; CI runs this
# On a machine without the project installed (the lent GPU machine), the repository root goes
# on PYTHONPATH; wheels carried in .whl/ (e.g. bitsandbytes) are installed first when present.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu-check-site .whl/*.whl \
        && export PYTHONPATH="/tmp/gpu-check-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
exec "$PY" scripts/gpu_check.py "$@"
