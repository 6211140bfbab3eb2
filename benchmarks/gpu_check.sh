#!/usr/bin/env bash
# One call on a lent GPU machine: the CUDA tests, the same-process A/B of the kernel options at
# 1k tokens, then the reuse benchmark with the option that won the A/B (benchmarks/pick_variant.py;
# the defaults unless one is faster in both modes by 2%). Each step has its own time limit so a
# slow one cannot eat the next. Outputs go to gpu_check_out/ (kept on a warm machine between
# calls, so `ab` and `bench` may run in separate calls) and are copied to $OUT when it is set
# (as gpu_check_out.tgz where there are more than 8 files, e.g. after ab1k).
#
#   bash benchmarks/gpu_check.sh            # tests ab bench: at most 580 s of steps (run it with timeout_s 600)
#   bash benchmarks/gpu_check.sh tests ab   # some of them: tests, ab, ab90, ab1k, bench, bench1k
set -uo pipefail
cd "$(dirname "$0")/.."
out=gpu_check_out
mkdir -p "$out"
export PYTHONUNBUFFERED=1
steps=${*:-tests ab bench}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
# benchmarks/variants.py:AB_VARIANTS by number: the defaults, the merge and key slices before,
# without the SiLU kernel & co., without the q/k/v kernel, fewer token buckets, addmm residual
# (AB_ONLY=... in the environment picks others)
AB_ONLY=${AB_ONLY:-0,22,21,15,6,11}
ab_run() {  # NAME LIMIT_S DIAG_ARGS...: one same-process A/B at 1k tokens -> $out/NAME.{json,txt}
  local name=$1 limit=$2; shift 2
  timeout "$limit" python3 benchmarks/diag_reuse_profile.py --tokens 1024 "$@" --ab --ab-only "$AB_ONLY" \
    --ab-json "$out/$name.json" >"$out/$name.txt" 2>&1
}
variant() { python3 benchmarks/pick_variant.py "$out"/ab_*.json 2>>"$out/pick.txt" || echo 0; }
for step in $steps; do
  case $step in
    tests)
      timeout 160 python3 -m pytest -q -p no:cacheprovider tests/workers/test_gpu_paths.py >"$out/tests.txt" 2>&1
      tail -4 "$out/tests.txt" ;;
    ab)  # 1k, dhd r=.05 at 98% (with a kernel table and a Python profile) and cacheblend at 90%
      ab_run ab_dhd 120 --mode dhd --reuse 0.98 --ratio 0.05 --rows 45 --cprofile 40
      ab_run ab_cacheblend 90 --mode cacheblend --reuse 0.9 --rows 0
      grep -hE "prefill|GPU kernel" "$out/ab_dhd.txt" "$out/ab_cacheblend.txt" ;;
    ab90)  # the 1k cells nearest their target (90% reused)
      ab_run ab90_dhd 130 --mode dhd --reuse 0.9 --ratio 0.15 --rows 0
      ab_run ab90_cacheblend 130 --mode cacheblend --reuse 0.9 --rows 0
      grep -hE "prefill" "$out/ab90_dhd.txt" "$out/ab90_cacheblend.txt" ;;
    ab1k)  # every 1k reuse cell of the benchmark
      for cell in "dhd 0.9 0.15" "dhd 0.9 0.05" "cacheblend 0.9 0.15" "dhd 0.98 0.15" "dhd 0.98 0.05" "cacheblend 0.98 0.15"; do
        read -r mode reuse ratio <<<"$cell"
        ab_run "ab1k_${mode}_${reuse}_${ratio}" 75 --mode "$mode" --reuse "$reuse" --ratio "$ratio" --rows 0
      done
      grep -H "prefill" "$out"/ab1k_*.txt ;;
    bench)
      v=$(variant); echo "bench with variant $v"
      timeout 210 python3 benchmarks/reuse_gpu_bench.py --variant "$v" --out "$out/reuse_gpu.json" 2>&1 | tail -42 ;;
    bench1k)
      v=$(variant); echo "bench (1k) with variant $v"
      timeout 90 python3 benchmarks/reuse_gpu_bench.py --lengths 1024 --variant "$v" --out "$out/reuse_gpu_1k.json" 2>&1 | tail -14 ;;
    *) echo "unknown step $step (tests, ab, ab90, ab1k, bench, bench1k)" >&2; exit 2 ;;
  esac
done
if [ -n "${OUT:-}" ]; then  # at most 8 files come back from a device call: more go as one archive
  shopt -s nullglob
  files=("$out"/*.json "$out"/*.txt)
  if [ ${#files[@]} -le 8 ]; then cp "${files[@]}" "$OUT"/; else tar czf "$OUT/gpu_check_out.tgz" "$out"; fi
fi
true
