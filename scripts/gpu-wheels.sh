#!/usr/bin/env bash
# Fetch into .whl/ the wheels that `make gpu-check` needs on the lent GPU machine and its image
# lacks (its python3 3.12 holds CUDA torch, torchvision, timm, pandas, scikit-learn, matplotlib,
# safetensors, huggingface_hub, ...; nothing can be fetched there). Run here, where pip reaches
# the registry; the device tool then carries .whl (git-ignored) and scripts/gpu-check.sh
# installs it. Versions are this project's pins (requirements*.txt) and the ones they resolve to.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
MISSING=(
  snakemake==9.27.1 snakemake-interface-common==1.23.0 snakemake-interface-executor-plugins==9.4.0
  snakemake-interface-logger-plugins==2.1.0 snakemake-interface-report-plugins==1.3.0
  snakemake-interface-scheduler-plugins==2.0.2 snakemake-interface-storage-plugins==4.4.1
  open-clip-torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 jsonschema==4.26.0 jsonschema-specifications==2025.9.1
  referencing==0.37.0 rpds-py==2026.9.1 annotated-types==0.8.0 argparse-dataclass==2.0.0 conda-inject==1.3.2
  configargparse==1.9.0 connection-pool==0.0.3 docutils==0.22.4 dpath==2.2.0 fastjsonschema==2.22.3 gitdb==4.0.12
  gitpython==3.2.1 greenlet==3.5.6 humanfriendly==10.0 immutables==0.21 jupyter-core==5.9.1 nbformat==5.11.1
  platformdirs==4.14.9 pulp==3.3.2 pydantic==2.14.4 pydantic-core==2.50.5 smart-open==7.7.1 smmap==5.0.3
  sqlalchemy==2.0.58 sqlmodel==0.0.37 tenacity==9.2.1 throttler==1.2.3 traitlets==5.16.1 typing-inspection==0.4.5
  yte==1.9.4
)
PLATFORM=(--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
          --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
for req in "${MISSING[@]}"; do
  name=${req%%==*}
  if compgen -G ".whl/$(echo "$name" | tr - _)-*.whl" >/dev/null || compgen -G ".whl/${name}-*.whl" >/dev/null; then
    continue
  fi
  # A pure-Python package published as a source archive only (connection-pool) is built here.
  python3 -m pip download -q --no-deps --only-binary=:all: "${PLATFORM[@]}" -d .whl "$req" 2>/dev/null \
    || python3 -m pip wheel -q --no-deps -w .whl "$req"
done
du -sh .whl
