#!/usr/bin/env bash
# One device session: install, GPU tests, model-level and kernel benchmarks.
# Everything lands in $OUT (8 files at most come back from the device tool):
#   env.txt tests.log models.json models.md models.log kernels.json kernels.md ab.md
# One call is limited to 600 s: run it twice, STEPS=models then
# STEPS=ab,gpu_tests,kernel_tests,kernels (tests.log is appended to).
# Each step has its own time limit (seconds, overridable), so a slow step
# cannot starve the others. DRY=1: tiny shapes (a CPU rehearsal).
set -u
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
Q=""; [ "${DRY:-0}" = 1 ] && Q="--quick"
{
  date -u
  python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -3
  nvidia-smi -L 2>&1
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"
} > "$OUT/env.txt" 2>&1
step() {  # name limit command...
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  timeout "$limit" "$@"
  echo "step $name rc=$? seconds=$(( $(date +%s) - t0 ))" >> "$OUT/env.txt"
}
XDIST=""; python3 -c "import xdist" 2>/dev/null && XDIST="-n 4"
STEPS=${STEPS:-gpu_tests,models,kernels,kernel_tests}
for s in ${STEPS//,/ }; do
  case $s in
    gpu_tests) step gpu_tests "${T_TESTS:-130}" python3 -m pytest -q -p no:cacheprovider $XDIST -m gpu \
                 ${TESTS_K:+-k "$TESTS_K"} tests/test_gpu.py >> "$OUT/tests.log" 2>&1 ;;
    models) step models "${T_MODELS:-560}" python3 bench/bench_models.py $Q --models bert-base,smollm2-135m \
              --reps "${REPS:-3}" ${DTYPES:+--dtypes $DTYPES} --out "$OUT/models.json" --md "$OUT/models.md" \
              > "$OUT/models.log" 2>&1 ;;
    kernels) step kernels "${T_KERNELS:-170}" python3 bench/run_kernels.py $Q --quick --out "$OUT/kernels.json" \
               --md "$OUT/kernels.md" > "$OUT/kernels.log" 2>&1 ;;
    attn_long) step attn_long "${T_ATTN:-60}" python3 bench/run_kernels.py --only attention \
                 --attention-shapes long-4096 --dtypes float32 --out "$OUT/kernels.json" --md "$OUT/kernels.md" \
                 > "$OUT/kernels.log" 2>&1 ;;
    kernel_tests) step kernel_tests "${T_KTESTS:-120}" python3 -m pytest -q -p no:cacheprovider $XDIST -m gpu \
                    tests/test_kernels_dense.py tests/test_kernels_attention.py >> "$OUT/tests.log" 2>&1 ;;
    # A/B of dispatch choices at model level (BERT-base fp32), against the models
    # table: the O(n log n) torch layer norm vs the O(n²) kernel for abs; for the
    # fp32 abs/entropy matmuls the fused Triton GEMM, and exp/log fused around
    # cuBLAS, vs the torch exp + cuBLAS + log of the current policy
    ab) { SEMITRITON_FORCE_REFERENCE=layer_norm:abs timeout "${T_AB:-55}" python3 bench/bench_models.py \
            $Q --models bert-base --dtypes float32 --semirings abs --reps 3 --md /dev/null 2>&1 \
            | grep -E "^\| bert" | sed 's/patch()/LN abs: torch closed form/'
          SEMITRITON_FORCE_KERNEL=matmul:abs,matmul:entropy timeout "${T_AB:-55}" python3 bench/bench_models.py \
            $Q --models bert-base --dtypes float32 --semirings abs,entropy --reps 3 --md /dev/null 2>&1 \
            | grep -E "^\| bert" | sed 's/patch()/fp32 matmul: Triton kernel/'
          SEMITRITON_FORCE_KERNEL=matmul_cublas:abs,matmul_cublas:entropy timeout "${T_AB:-55}" \
            python3 bench/bench_models.py $Q --models bert-base --dtypes float32 --semirings abs,entropy --reps 3 \
            --md /dev/null 2>&1 | grep -E "^\| bert" | sed 's/patch()/fp32 matmul: fused exp\/log + cuBLAS/'
        } > "$OUT/ab.md"; echo "step ab done" >> "$OUT/env.txt" ;;
  esac
done
cat "$OUT/env.txt"; tail -n 8 "$OUT/tests.log" 2>/dev/null; cat "$OUT/models.md" 2>/dev/null
cat "$OUT/kernels.md" 2>/dev/null; cat "$OUT/ab.md" 2>/dev/null
