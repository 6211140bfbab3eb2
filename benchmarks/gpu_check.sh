#!/usr/bin/env bash
# One call on a lent GPU machine: the CUDA tests, then the same-process A/B of the kernel options
# at 1k tokens, then the reuse benchmark. Each step has its own time limit so a slow one cannot
# eat the next; outputs go to $OUT (or ./gpu_check_out), the last lines summarize.
#
#   bash benchmarks/gpu_check.sh            # all three (about 9 minutes on an H200)
#   bash benchmarks/gpu_check.sh tests ab   # some of them: tests, ab, bench, bench1k
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu_check_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
steps=${*:-tests ab bench}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
for step in $steps; do
  case $step in
    tests)
      timeout 200 python3 -m pytest -q -p no:cacheprovider tests/workers/test_gpu_paths.py >"$out/tests.txt" 2>&1
      tail -4 "$out/tests.txt" ;;
    ab)  # diag_reuse_profile.AB_VARIANTS by number: default, q/k/v kernel, fewer token buckets, attention tilings, addmm
      timeout 140 python3 benchmarks/diag_reuse_profile.py --mode dhd --tokens 1024 --reuse 0.98 --ratio 0.05 \
        --rows 45 --ab --ab-only 0,2,6,8,9,10,11,12 --cprofile 40 >"$out/ab_dhd.txt" 2>&1
      timeout 100 python3 benchmarks/diag_reuse_profile.py --mode cacheblend --tokens 1024 --reuse 0.9 \
        --rows 0 --ab --ab-only 0,2,6,8,11,12,7 >"$out/ab_cacheblend.txt" 2>&1
      grep -hE "prefill|GPU kernel" "$out/ab_dhd.txt" "$out/ab_cacheblend.txt" ;;
    bench)
      timeout 260 python3 benchmarks/reuse_gpu_bench.py --out "$out/reuse_gpu.json" 2>&1 | tail -42 ;;
    bench1k)
      timeout 90 python3 benchmarks/reuse_gpu_bench.py --lengths 1024 --out "$out/reuse_gpu_1k.json" 2>&1 | tail -14 ;;
    *) echo "unknown step $step (tests, ab, bench, bench1k)" >&2; exit 2 ;;
  esac
done
