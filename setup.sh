#!/usr/bin/env bash
# Creates ./.venv with everything the product and the tests need; fast when it is already there.
#   bash setup.sh            # then: .venv/bin/python -m ...
#   LATEST=1 bash setup.sh   # the newest releases of the test oracles instead of constraints.txt's
# TORCH_SPEC picks the torch build (default torch==2.13.0: on a GPU machine PyPI gives its CUDA
# build; on the project's CPU machines pip takes the CPU build lying on disk). constraints.txt holds
# the versions the suite is known to pass with (diffusers, transformers, peft, kernels, ...).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
constraints=(-c constraints.txt)
[ "${LATEST:-0}" = 1 ] && constraints=()
stamp=.venv/.flux-minimal-installed
want="$(cat pyproject.toml setup.sh constraints.txt | sha256sum | cut -c1-16)-latest=${LATEST:-0}"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
    .venv/bin/python -m pip install -q ${constraints[@]+"${constraints[@]}"} ".[test]"
    echo "$want" > "$stamp"
fi
