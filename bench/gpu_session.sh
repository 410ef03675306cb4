#!/usr/bin/env bash
# One device session: install, GPU tests, model-level and kernel benchmarks.
# Everything lands in $OUT (8 files at most come back from the device tool):
#   env.txt (versions, one line per step with its exit code and seconds), tests.log,
#   models.log (the warm-up's log, then the models step's), models.json, models.md,
#   kernels.json, kernels.md, kernels.log; and ab.md, mm.md, mm_bf16.md, linear.md +
#   linear.log, host.md when those steps run (name fewer default steps to stay at 8).
# The script exits with the number of steps that failed or ran out of time.
# The default STEPS fit one call (limits 130 + 90 + 240 + 30 + 60 = 550 s, plus the install; on the
# H100s of 2026-11-26/27 the kernel tests took 150-170+ s with a cold Triton cache and
# 112 s warm, the engine tests 53 s, the warm-up 48-62 s, the fp32 model rows 93-138 s):
#   gpu_tests  the engine and CUDA-graph tests (pytest -m gpu, xdist), and the kernel
#            tests of code not yet run on a GPU (NEW_TESTS), first and alone:
#            sharing the CPU with compiling processes left tests unfinished;
#   warm     one untimed pass per model/dtype/semiring in parallel processes
#            (compiles every autotune candidate: attention plans, PIPE, split-J),
#            so that Triton compiles (CPU-bound) on all cores at once;
#   models   the model table (DTYPES, default float32; BERT-base, SmolLM2 config), with a
#            cuda_graph=True row per semiring (CUDA_GRAPH=0: without); its markdown
#            and JSON are rewritten after every row, so a time limit loses one row;
#   kernels_sel  kernel rows for KSEL (default: layer norm, also with 32 live rows
#            of 4096 as next to an LM head, GELU/SiLU rules, attention; fp32, BERT shapes);
#   kernel_tests  the compiled-kernel tests, last (with a cold cache they outlast
#            any limit this call leaves them; `STEPS=kernel_tests` alone on the
#            warm machine finishes them).
# Other steps: linear (patch(linear=True): SmolLM2 and BERT-base fp32, real-walk /
# abs / entropy; linear.md, ~90 s), ab (dispatch alternatives on BERT-base fp32, see below),
# kernels (the quick kernel table), kernels_new (RMS-norm rows), attn_long,
# mm_models (maxabs/max matmuls at the models' shapes with every autotuner
# candidate's time, split-J included; mm.md, ~1 min), mm_bf16 (the abs/entropy
# matmuls of the BERT FFN with bf16 weights: in-loop split against the pre-split
# PRE candidates; mm_bf16.md, ~30 s), host (bench_host.py on
# this machine's CPU, launches stubbed, with --ops: how its host compares with
# the development machine's, where the host-time tables of RESULTS come from;
# host.md, ~1 min).
# The models step also appends the autotuner's measurements to models.md. kernels_sel,
# kernels, kernels_new and attn_long write the same kernels.{md,json,log}: run one per call.
# Knobs: WARM_DTYPES (default float32, as DTYPES), WARM_GROUPS (semiring groups warmed in parallel), WARM_TESTS
# (tests to run beside the warm-up), WARM_AB (A/B variants to warm up; empty: none),
# DTYPES (models step; default float32, "float32,bfloat16" for both), SEMIRINGS, REPS,
# CHECK (semirings checked against the torch reference in the models step; "none"),
# CUDA_GRAPH (default 1: also a cuda_graph=True row per semiring; 0: without), LINEAR=1
# (also BERT-base fp32 with patch(linear=True), ~40 s more), GPU_TESTS and TESTS_K
# (files and -k of the gpu_tests step), XDIST_N, KSEL and KSHAPES (kernels and
# attention shapes of kernels_sel), MM_SEMIRINGS (mm_models), and the time limits in
# seconds: T_TESTS (gpu_tests), T_WARM, T_MODELS, T_KSEL, T_KTESTS (kernel_tests),
# T_MM (mm_models), T_MMBF16, T_LINEAR, T_HOST, T_KNEW, T_KERNELS, T_ATTN, T_AB.
# Each step has its own time limit, so a slow step cannot starve the others.
# DRY=1: tiny shapes (a CPU rehearsal).
set -u
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 TOKENIZERS_PARALLELISM=false
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
Q=""; [ "${DRY:-0}" = 1 ] && Q="--quick"
{
  date -u
  python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -3
  nvidia-smi -L 2>&1
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"
} > "$OUT/env.txt" 2>&1
: > "$OUT/tests.log"; : > "$OUT/models.log"
FAILED=0
step() {  # name limit command...
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s) rc
  timeout "$limit" "$@"
  rc=$?
  [ "$rc" = 0 ] || FAILED=$((FAILED + 1))
  echo "step $name rc=$rc$([ "$rc" = 124 ] && echo ' (time limit)') seconds=$(( $(date +%s) - t0 ))" >> "$OUT/env.txt"
}
XDIST=""; python3 -c "import xdist" 2>/dev/null && XDIST="-n ${XDIST_N:-8}"
STEPS=${STEPS:-gpu_tests,warm,models,kernels_sel,kernel_tests}
GRAPH_ROWS=""; [ "${CUDA_GRAPH:-1}" = 1 ] && GRAPH_ROWS=--cuda-graph
LINEAR_ROWS=""; [ "${LINEAR:-0}" = 1 ] && LINEAR_ROWS=--linear-variant
M=bench/bench_models.py
# kernel tests of code changed since the last GPU run, in the first step (the
# kernel_tests step, last, is often cut off): the layer-norm candidates with a
# row of zero values (eighth session), the RMS-norm kernel (sixth session),
# every tropical attention plan with GQA (the chunked contractions), the
# pre-split bf16/fp16 GEMM and the norms' separate redo launch (maxabs, max; ninth session),
# the sorted abs layer norm's skip of zero rows (twelfth session), torch's fused RMS-norm node
# (FusedRmsNormBackward0, recorded only on CUDA) and vision models with cuDNN convolutions and
# batch norm (thirteenth session), grid_sample on CUDA (cuDNN's grid-sampler node for bilinear,
# zero padding, align_corners; fourteenth session), every attention plan at head dims 80/128/256,
# the abs/entropy linears with TF32 allowed and fp16 weights on the cuBLAS path (twentieth session),
# the complex rotary node of patched LLaMA 4 / DeepSeek-V2 (twenty-first session)
NEW_TESTS="tests/test_gpu.py::test_complex_rotary_models_triton_equals_torch_reference tests/test_kernels_attention.py::test_wide_heads_every_plan_gpu tests/test_gpu.py::test_statistics_keep_fp32_accuracy_with_tf32_on
 tests/test_kernels_dense.py::test_fp16_weights_keep_terms_far_below_the_row_maximum
 tests/test_kernels_dense.py::test_norm_every_candidate_gpu tests/test_kernels_dense.py::test_rms_norm_from_input
 tests/test_kernels_dense.py::test_layer_norm_abs_sorted
 tests/test_kernels_attention.py::test_every_launch_plan_gpu[maxabs-causal_gqa]
 tests/test_kernels_attention.py::test_every_launch_plan_gpu[max-causal_gqa]
 tests/test_kernels_dense.py::test_matmul_lowp_pre_split tests/test_kernels_dense.py::test_maxabs_norm_underflow_fallback
 tests/test_kernels_dense.py::test_max_norm_zero_weight_edges
 tests/test_fused_rms_norm.py tests/test_vision_models.py
 tests/test_sampling_distance_rules.py::test_on_cuda_against_the_oracle tests/test_gpu.py::test_readouts_on_cuda
 tests/test_kernels_dense.py::test_maxplus_blocked_kernel
 tests/test_weight_cache.py::test_an_ablation_through_data_changes_the_next_pass
 tests/test_gpu.py::test_readouts_inside_cuda_autocast_and_inference_mode"
for s in ${STEPS//,/ }; do
  case $s in
    warm) t0=$(date +%s)
          [ -n "${WARM_TESTS:-}" ] && timeout "${T_WARM:-90}" python3 -m pytest -q -p no:cacheprovider $XDIST \
            -m gpu $WARM_TESTS >> "$OUT/tests.log" 2>&1 &
          for m in bert-base smollm2-135m; do for dt in ${WARM_DTYPES:-float32}; do
            for g in ${WARM_GROUPS:-real-walk,abs maxabs entropy max}; do
              OMP_NUM_THREADS=2 timeout "${T_WARM:-90}" python3 $M $Q --warm-only --models $m --dtypes $dt \
                --semirings $g >> "$OUT/models.log" 2>&1 &
            done; done; done
          for f in ${WARM_AB:-}; do
            SEMITRITON_FORCE_KERNEL=$f OMP_NUM_THREADS=2 timeout "${T_WARM:-90}" python3 $M $Q --warm-only \
              --models bert-base --dtypes float32 --semirings abs,entropy >> "$OUT/models.log" 2>&1 &
          done
          wait
          # the RMS-norm kernels' GPU tests ran in gpu_tests (NEW_TESTS): if they failed,
          # the models step uses the torch closed forms for both entry points
          grep -q "FAILED.*test_rms_norm_from_input\|FAILED.*rms_norm_closed_form" "$OUT/tests.log" 2>/dev/null && {
            export SEMITRITON_FORCE_REFERENCE=$(for s in abs entropy maxabs max; do
              printf 'rms_norm:%s,rms_norm_from_input:%s,' $s $s; done)
            echo "an rms_norm kernel failed its GPU test: the models step uses the torch closed forms" >> "$OUT/env.txt"; }
          echo "step warm seconds=$(( $(date +%s) - t0 ))" >> "$OUT/env.txt" ;;
    kernels_sel) step kernels_sel "${T_KSEL:-30}" python3 bench/run_kernels.py $Q --quick \
                   --kernels "${KSEL:-layer_norm,activation,attention}" --dtypes fp32,float32 \
                   --attention-shapes "${KSHAPES:-bert-base}" --out "$OUT/kernels.json" --md "$OUT/kernels.md" \
                   > "$OUT/kernels.log" 2>&1 ;;
    mm_models) step mm_models "${T_MM:-60}" python3 bench/run_kernels.py $Q --only dense --kernels matmul \
                 --semirings "${MM_SEMIRINGS:-maxabs,max}" --dtypes fp32 --no-reference \
                 --labels "BERT q/k/v/o,BERT FFN,32 live rows,SmolLM2 q/o,SmolLM2 k/v,SmolLM2 MLP,8 live rows" \
                 --md "$OUT/mm.md" > /dev/null 2>&1 ;;
    mm_bf16) step mm_bf16 "${T_MMBF16:-45}" python3 bench/run_kernels.py $Q --quick --only dense --kernels matmul \
               --semirings abs,entropy --dtypes bf16 --md "$OUT/mm_bf16.md" > /dev/null 2>&1 ;;
    linear) step linear "${T_LINEAR:-90}" python3 bench/bench_models.py $Q --models smollm2-135m,bert-base \
              --dtypes float32 --semirings real-walk,abs,entropy --reps "${REPS:-3}" --linear-only --check none \
              --md "$OUT/linear.md" > "$OUT/linear.log" 2>&1 ;;
    host) step host "${T_HOST:-90}" python3 bench/bench_host.py --reps 5 --ops > "$OUT/host.md" 2>&1 ;;
    kernels_new) step kernels_new "${T_KNEW:-40}" python3 bench/run_kernels.py $Q --only dense --kernels rms_norm \
                   --dtypes fp32 --md "$OUT/kernels.md" > /dev/null 2>&1 ;;
    gpu_tests) step gpu_tests "${T_TESTS:-130}" python3 -m pytest -q -p no:cacheprovider $XDIST -m gpu \
                 ${TESTS_K:+-k "$TESTS_K"} ${GPU_TESTS:-tests/test_gpu.py tests/test_cuda_graph.py $NEW_TESTS} \
                 >> "$OUT/tests.log" 2>&1 ;;
    models) step models "${T_MODELS:-240}" python3 bench/bench_models.py $Q --models bert-base,smollm2-135m \
              --reps "${REPS:-3}" --dtypes "${DTYPES:-float32}" ${CHECK:+--check $CHECK} $LINEAR_ROWS \
              ${SEMIRINGS:+--semirings $SEMIRINGS} $GRAPH_ROWS --out "$OUT/models.json" --md "$OUT/models.md" \
              >> "$OUT/models.log" 2>&1 ;;
    kernels) step kernels "${T_KERNELS:-170}" python3 bench/run_kernels.py $Q --quick --out "$OUT/kernels.json" \
               --md "$OUT/kernels.md" > "$OUT/kernels.log" 2>&1 ;;
    attn_long) step attn_long "${T_ATTN:-60}" python3 bench/run_kernels.py --only attention \
                 --attention-shapes long-4096 --dtypes float32 --out "$OUT/kernels.json" --md "$OUT/kernels.md" \
                 > "$OUT/kernels.log" 2>&1 ;;
    kernel_tests) step kernel_tests "${T_KTESTS:-60}" python3 -m pytest -q -p no:cacheprovider $XDIST -m gpu \
                    tests/test_kernels_dense.py tests/test_kernels_attention.py >> "$OUT/tests.log" 2>&1 ;;
    # A/B of dispatch choices at model level (BERT-base fp32), against the models
    # table: the O(n log n) torch layer norm vs the O(n²) kernel for abs; for the
    # fp32 abs/entropy matmuls the fused Triton GEMM, and the plain torch
    # exp + cuBLAS + log, vs exp/log fused around cuBLAS (the current policy)
    ab) { echo "| model | dtype | variant | semiring | native fwd+bwd ms | ours fwd+bwd ms | backward ratio (target) | ratio to autograd, patched | peak MiB (ratio) | walk: Python overhead / backward ms | Triton vs torch rel. err. |"
          echo "|---|---|---|---|---|---|---|---|---|---|---|"
          SEMITRITON_FORCE_REFERENCE=layer_norm:abs timeout "${T_AB:-35}" python3 bench/bench_models.py \
            $Q --models bert-base --dtypes float32 --semirings abs --reps 3 --md /dev/null 2>&1 \
            | grep -E "^\| bert" | sed 's/patch()/LN abs: torch closed form/'
          SEMITRITON_FORCE_KERNEL=matmul:abs,matmul:entropy timeout "${T_AB:-35}" python3 bench/bench_models.py \
            $Q --models bert-base --dtypes float32 --semirings abs,entropy --reps 3 --md /dev/null 2>&1 \
            | grep -E "^\| bert" | sed 's/patch()/fp32 matmul: Triton kernel/'
          SEMITRITON_FORCE_REFERENCE=matmul_cublas:abs,matmul_cublas:entropy timeout "${T_AB:-35}" \
            python3 bench/bench_models.py $Q --models bert-base --dtypes float32 --semirings abs,entropy --reps 3 \
            --md /dev/null 2>&1 | grep -E "^\| bert" | sed 's/patch()/fp32 matmul: torch exp + cuBLAS + log/'
        } > "$OUT/ab.md"; echo "step ab done" >> "$OUT/env.txt" ;;
  esac
done
cat "$OUT/env.txt"; tail -n 8 "$OUT/tests.log" 2>/dev/null
echo "warm-up errors: $(grep -c '^\[.*\] warm .*ERROR' "$OUT/models.log" 2>/dev/null)"
cat "$OUT/models.md" 2>/dev/null
cat "$OUT/kernels.md" 2>/dev/null; cat "$OUT/ab.md" 2>/dev/null; cat "$OUT/mm.md" 2>/dev/null
cat "$OUT/linear.md" 2>/dev/null; cat "$OUT/host.md" 2>/dev/null
echo "steps failed or out of time: $FAILED"
exit "$FAILED"
