#!/usr/bin/env bash
# GPU smoke test, for whoever has an NVIDIA GPU (CI does not need or run it): the parity
# checks against transformers and a whole cluster with every service on the GPU, in fp32 and
# bf16 (tests/gpu/test_gpu_smoke.py). Needs a CUDA build of torch in .venv, e.g.
#   .venv/bin/pip install --force-reinstall "torch>=2.4,<2.14" --index-url https://download.pytorch.org/whl/cu124
set -euo pipefail
cd "$(dirname "$0")/.."
make install >/dev/null
.venv/bin/python -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else
    "torch sees no CUDA device: install a CUDA build of torch into .venv (see this script)")'
.venv/bin/python -c 'import torch; print("GPU:", torch.cuda.get_device_name(0), "torch", torch.__version__)'
EPSERVE_GPU=1 exec .venv/bin/python -m pytest -q -s tests/gpu "$@"
