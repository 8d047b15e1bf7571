#!/bin/bash
# The one device call that measured docs/results/gpu.md (docs/gpu-howto.md, step 3). Arguments: the
# benchmark commands to run after the ORT CUDA install, each one quoted; results go to $OUT/gpu.json.
#   bash benchmarks/speed/gpu_device.sh "compress --model llama-2-7b --layers 1" "throughput --model llama-2-7b --layers 8 --ratios 0 0.4"
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
test -d /tmp/parts || { echo "machine went cold: move the parts again"; exit 1; }
cp .dev/parts/ort_ad /tmp/parts/ 2>/dev/null  # the last part travels with this call
mkdir -p /tmp/ortsite && cat /tmp/parts/ort_* | xz -d | tar xf - -C /tmp/ortsite || exit 1
python3 -m pip install -q --no-deps --no-index --target /tmp/ortsite /tmp/small/*.whl || exit 1
export PYTHONPATH=/tmp/ortsite:$PWD
python3 -c "import torch, onnxruntime as ort; ort.preload_dlls(); print(ort.__version__, ort.get_available_providers())" || exit 1
for part in "$@"; do
    # shellcheck disable=SC2086  # each argument is one benchmark command line
    python3 -m benchmarks.speed.gpu $part --results "$OUT/gpu.json" 2>&1 | grep -E '"part"|Error|error' | cut -c1-900
    echo "[$part] rc=${PIPESTATUS[0]} at ${SECONDS}s"
done
