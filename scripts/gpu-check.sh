#!/usr/bin/env bash
# `make gpu-check`: the GPU figures (scripts/gpu_check.py) on a machine with a GPU, in the python
# that holds its CUDA torch (GPU_PYTHON, default python3). Packages that python lacks
# (Snakemake, open_clip, ...) travel as wheels in .whl/ (scripts/gpu-wheels.sh fetches them on
# a machine with the package registry) and are installed into a folder of their own first.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${GPU_PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
  site=${TMPDIR:-/tmp}/foldsoup-gpu-site
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  export PATH="$site/bin:$PATH"
fi
export PYTHONUNBUFFERED=1
exec "$PY" scripts/gpu_check.py --json "${OUT:-.}/gpu-check.json" "$@"
