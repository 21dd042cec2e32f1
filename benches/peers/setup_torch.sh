#!/usr/bin/env bash
# Creates benches/peers/.venv (gitignored) and installs PyTorch (CPU use; the PyPI wheel) and
# numpy there, for torch_compare.py. Idempotent: an existing venv with torch importable is
# left as it is. Nothing here is a dependency of the library.
#
#   bash benches/peers/setup_torch.sh          # then: benches/peers/.venv/bin/python ...
#
# Environment: PYTHON (default python3) picks the interpreter; TORCH_SPEC (default "torch")
# pins a version, e.g. TORCH_SPEC="torch==2.5.1".
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="$here/.venv"
python="${PYTHON:-python3}"
spec="${TORCH_SPEC:-torch}"

if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c 'import torch, numpy' 2>/dev/null; then
    echo "torch already installed in $venv: $("$venv/bin/python" -c 'import torch; print(torch.__version__)')"
    exit 0
fi

if [ ! -x "$venv/bin/python" ]; then
    if ! "$python" -m venv "$venv"; then
        echo "python3 -m venv failed; on Debian/Ubuntu: apt-get install python3-venv" >&2
        exit 1
    fi
fi
"$venv/bin/python" -m pip install --upgrade pip
# From PyPI only (no other index): on x86-64 Linux this wheel pulls the CUDA runtime
# packages as dependencies too, a few GB of download; the CPU kernels are what is timed.
"$venv/bin/python" -m pip install "$spec" numpy
"$venv/bin/python" -c 'import torch; print("torch", torch.__version__, "installed in", "'"$venv"'")'
