#!/usr/bin/env bash
# One prepared call on a lent GPU machine (see BENCHMARKS.md "GPU"). That machine has torch and
# pyarrow but no ray, s3fs or network, so this runs what needs no Ray: the CUDA tests, the
# model's levers on the bare model (jobs/levers.py) and how processes share the GPU
# (jobs/gpu_share.py). duckdb and pycocotools travel as wheels in .whl/, downloaded here with
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl \
#     duckdb==2.0.1 pycocotools==2.0.11
# device run: carry .whl, command `bash jobs/gpu_check.sh [levers]`
set -u
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    python3 -c "import torch, torchvision; print(torch.__version__, torchvision.__version__, torch.cuda.get_device_name(0))"
    nproc
} 2>&1 | tee "$OUT/machine.txt"
timeout 150 python3 -m pytest -q -p no:cacheprovider -o addopts="" \
    tests/test_model.py tests/test_levers.py -k "cuda or gpu" 2>&1 | tee "$OUT/tests.txt"
if [[ "${1:-}" == levers ]]; then
    timeout 330 python3 jobs/levers.py --device cuda --width 1066 --height 800 --detections 100 \
        --images 64 --batch-sizes 1,4,8,16 --json "$OUT/levers-gpu.json" 2>&1 | tee "$OUT/levers.txt"
fi
timeout 300 python3 jobs/gpu_share.py --device cuda --processes 1,2,4 --channels-last \
    --json "$OUT/gpu-share.json" 2>&1 | tee "$OUT/share.txt"
echo "done"
