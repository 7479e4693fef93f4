#!/usr/bin/env bash
# Run `zeroest validate` on a GPU machine that has torch/transformers/accelerate but no DeepSpeed and no network:
# DeepSpeed and its missing dependencies come as wheels in .whl/ (built elsewhere), zeroest is installed from this
# checkout without touching the network. Results land in $OUT (or ./gpu-out).
# usage: bash benchmarks/device_validate.sh GRID[+GRID...] [extra validate flags...]  (several grids run as one)
set -uo pipefail
out=$(realpath -m "${OUT:-gpu-out}")
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
python3 -m pip install -q --no-index --no-deps --no-build-isolation --upgrade --target /tmp/zs . >/dev/null || exit 1
export PYTHONPATH=/tmp/site:/tmp/zs${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
export TORCH_CUDA_ARCH_LIST=9.0 TORCH_EXTENSIONS_DIR=/tmp/torch_ext
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch, transformers, accelerate, deepspeed; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__, 'deepspeed', deepspeed.__version__)" 2>&1 | tail -1 | tee -a "$out/gpu.txt"
grids=(); IFS=+ read -ra names <<< "${1:?grid}"; shift
for name in "${names[@]}"; do grids+=(--grid "$name"); done
# run from /tmp: in the checkout, ./zeroest would shadow the installed package (its subpackages are mapped)
(cd /tmp && python3 -m zeroest validate "${grids[@]}" --out "$out" "$@") 2>&1 | tee "$out/validate.log" | grep -v -E "Warning|warn|^\s*$" | tail -150
