#!/usr/bin/env bash
# Everything a session with a GPU should run: the CUDA tests, then the GPU benchmarks.
# Logs go to $OUT (the device tool's folder) or bench/results. Each step has its own time limit so
# one slow step cannot starve the others; a failing step does not stop the rest.
#
#   bash bench/gpu.sh [tests] [offload] [formats] [cpumiss] [dispatch]   # default: all five (about 13 minutes)
#   OFFLOAD_ARGS="--layers 24 --budget 8GiB --host-cache 24GiB" bash bench/gpu.sh offload
set -u
cd "$(dirname "$0")/.."
out=${OUT:-bench/results}
mkdir -p "$out"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
steps=${*:-tests offload formats cpumiss dispatch}
python3 - <<'EOF' 2>&1 | tee "$out/env.txt"
import torch, transformers, platform
print("torch", torch.__version__, "transformers", transformers.__version__, "python", platform.python_version())
print("gpu", torch.cuda.get_device_name(), torch.cuda.get_device_capability())
try:
    import bitsandbytes
    print("bitsandbytes", bitsandbytes.__version__)
except Exception as e:
    print("bitsandbytes unavailable:", e)
EOF
for step in $steps; do
  case $step in
    tests)
      timeout "${TESTS_TIMEOUT:-180}" python3 -m pytest -q -p no:cacheprovider tests/offload/test_cuda.py -x \
        --timeout 120 2>&1 \
        | tee "$out/tests.txt" | tail -40 ;;
    offload)
      # shellcheck disable=SC2086
      timeout "${OFFLOAD_TIMEOUT:-180}" python3 bench/offload.py --device cuda --workdir /tmp/moe_bench \
        --cgroup-limit none --json "$out/offload.json" ${OFFLOAD_ARGS:---layers 8 --budget 3GiB --host-cache 8GiB \
        --new-tokens 32 --runs 2} 2>&1 | tee "$out/offload.txt" | tail -40 ;;
    formats)
      # FP8 (Qwen3-30B-A3B-FP8 layout) and MXFP4 (gpt-oss-20b shapes) beside bf16 of the same shapes and
      # stock transformers' dequantize=True load; PCIe moves the stored bytes
      for fmt in fp8 mxfp4; do
        # shellcheck disable=SC2086
        timeout "${FORMATS_TIMEOUT:-100}" python3 bench/offload.py --device cuda --format $fmt --workdir /tmp/moe_bench \
          --cgroup-limit none --json "$out/offload_$fmt.json" ${FORMATS_ARGS:---layers 4 --budget 1GiB --host-cache 4GiB \
          --new-tokens 16 --runs 2} 2>&1 | tee "$out/offload_$fmt.txt" | tail -25
      done ;;
    cpumiss)
      # MXFP4 with the host tier's misses computed on the CPU (through the CPU kernels, overlapping the GPU's hits)
      # and without: tok/s, experts the CPU computed per token, PCIe bytes per token (issue 22)
      for mode in always never; do
        # shellcheck disable=SC2086
        timeout "${CPUMISS_TIMEOUT:-100}" python3 bench/offload.py --device cuda --format mxfp4 --cpu-compute $mode \
          --workdir /tmp/moe_bench --cgroup-limit none --json "$out/offload_mxfp4_cpu_$mode.json" \
          ${FORMATS_ARGS:---layers 4 --budget 1GiB --host-cache 4GiB --new-tokens 16 --runs 2} 2>&1 \
          | tee "$out/offload_mxfp4_cpu_$mode.txt" | tail -25
      done ;;
    dispatch)
      # shellcheck disable=SC2086
      timeout "${DISPATCH_TIMEOUT:-90}" python3 bench/dispatch.py --device cuda --full-size --rounds 20 \
        --out "$out/dispatch.json" ${DISPATCH_ARGS:---dtypes bfloat16 --tokens 1 32 512 \
        --shapes Mixtral-8x7B Qwen3-30B-A3B} 2>&1 | tee "$out/dispatch.txt" | tail -30 ;;
  esac
done
