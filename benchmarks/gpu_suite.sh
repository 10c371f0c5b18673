#!/usr/bin/env bash
# The benchmark suite on one CUDA GPU in a few minutes: overhead (ContinuousNet vs its ResNet), peers (torchdiffeq,
# torchdyn), memory (stored / recomputed steps, adjoint) and compile_speed, each in float32 and in bf16 autocast.
#
#   bash benchmarks/gpu_suite.sh [OUT_DIR]          # default OUT_DIR: outputs/gpu-<date>-<time>
#
# Every script writes OUT_DIR/<script>-<precision>.txt (its table) and .csv; OUT_DIR/device.txt describes the GPU.
# Needs the bench extra (torchdiffeq, torchdyn). DEVICE, PRECISIONS and EXTRA override the device (cuda), the
# precisions ("fp32 bf16") and add arguments to every script (EXTRA=--smoke: a check that the suite runs); PYTHON
# names the interpreter (default: python on PATH).
set -euo pipefail
out=$(realpath -m "${1:-outputs/gpu-$(date +%Y%m%d-%H%M%S)}")
device=${DEVICE:-cuda}
precisions=${PRECISIONS:-fp32 bf16}
python=${PYTHON:-python}
read -r -a extra <<< "${EXTRA:-}"
cd "$(dirname "$0")"
mkdir -p "$out"

"$python" - "$device" > "$out/device.txt" <<'PY'
import sys, torch
device = torch.device(sys.argv[1])
if device.type == "cuda":
    if not torch.cuda.is_available():
        sys.exit(f"no CUDA device on this machine (torch {torch.__version__}): the suite needs a GPU")
    print(torch.cuda.get_device_name(device), torch.cuda.get_device_properties(device))
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
PY

run() {
    local name=$1 script=$2
    shift 2
    echo "== $name"
    "$python" "$script" --device "$device" --csv "$out/$name.csv" "$@" "${extra[@]}" 2>&1 | tee "$out/$name.txt"
}

start=$SECONDS
for precision in $precisions; do
    run "overhead-$precision" overhead.py --precision "$precision" --steps 2 8 --repeats 10 --min-seconds 2 \
        --ungated --rk4-modes train infer
    run "peers-$precision" peers.py --precision "$precision" --repeats 10 --min-seconds 1
    run "memory-$precision" memory.py --precision "$precision" --batch-size 128 --repeats 5
    run "compile-$precision" compile_speed.py --precision "$precision" --repeats 10 --min-seconds 2
done
echo "suite done in $((SECONDS - start)) s; tables and CSV files in $out"
