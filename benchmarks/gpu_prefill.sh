#!/usr/bin/env bash
# The one prepared GPU check of the Triton kernels (issue 7), for a session that has a CUDA machine.
#
#   1. the GPU tests of tests/test_triton_ops.py (float32 and bfloat16 at realistic sizes, segmented and
#      not; default launch configurations);
#   2. `jrt bench prefill --device cuda`: sdpa (FlashAttention-2 backend), jrt_prompt (2T), jrt_rnn (T,
#      prefix T/2), based (T), and flash-linear-attention's Based kernels when `fla` imports;
#      B=16, H=16, head dim 64, F=16, bfloat16, T = 2k..32k, CUDA events, median; autotuned kernels;
#   3. the same with `--backward`: forward + backward of every method (FlashAttention-2's backward through
#      SDPA's flash backend, the Triton kernels' backward, flash-linear-attention's Based kernels' backward).
#
# Results go to $OUT (default: $TMPDIR/jrt-gpu-prefill), 8 files: env.txt, gpu_tests.log, prefill_cuda.log,
# prefill_cuda.json and prefill_cuda.md (the table to paste into the "Prefill on GPU" section of
# docs/benchmarks.md), and prefill_cuda_bwd.{log,json,md} for forward + backward. Expected run time on an
# H100/H200: a few minutes (mostly compiling and autotuning). SKIP_BACKWARD=1 leaves out step 3.
#
# Optional: flash-linear-attention for the comparison rows. It is a pure-Python wheel (it needs einops,
# which the GPU image has); where the GPU machine cannot reach a package index, download it into .whl/
# beside the repo first (and ignore .whl/ in git), and it is installed from there:
#     python -m pip download --no-deps fla-core -d .whl
# Environment: LENGTHS (default "2048,4096,8192,16384,32768"), BATCH (16), HEADS (16), REPEATS (5),
# SKIP_TESTS=1 to go straight to the benchmark, SKIP_BACKWARD=1 to skip step 3, PYTHON (default python3).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-${TMPDIR:-/tmp}/jrt-gpu-prefill}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
export TRITON_DEFAULT_FP_FUSION="${TRITON_DEFAULT_FP_FUSION:-1}"
LENGTHS="${LENGTHS:-2048,4096,8192,16384,32768}"

if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/jrt_site \
        .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/jrt_site"
fi

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
    "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
    "$PY" -c "import fla; print('fla', getattr(fla, '__version__', '?'))" 2>/dev/null || echo "fla: not installed"
} | tee "$OUT/env.txt"

status=0
if [ "${SKIP_TESTS:-0}" != "1" ]; then
    # the default launch configuration only (autotuning every specialisation would cost minutes of compiling)
    JRT_TRITON_AUTOTUNE=0 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_triton_ops.py 2>&1 \
        | tee "$OUT/gpu_tests.log"
    status=${PIPESTATUS[0]}
fi

# The CLI first. If the jrt command cannot even start here (another sub-command's import failing on this
# machine), the stand-alone module runs the same benchmark code; a benchmark that started is not rerun.
bench_args=(--lengths "$LENGTHS" --batch "${BATCH:-16}" --heads "${HEADS:-16}" --repeats "${REPEATS:-5}"
            --json "$OUT/prefill_cuda.json")
# TRITON_PRINT_AUTOTUNING logs each autotuned kernel's chosen configuration and time (for the next tuning)
TRITON_PRINT_AUTOTUNING=1 "$PY" -m jrt bench prefill --device cuda "${bench_args[@]}" 2>&1 \
    | tee "$OUT/prefill_cuda.log"
bench_status=${PIPESTATUS[0]}
if [ "$bench_status" != 0 ] && ! grep -q "jrt bench prefill (cuda):" "$OUT/prefill_cuda.log"; then
    echo "jrt could not start; running python -m jrt.bench.prefill_cuda" | tee -a "$OUT/prefill_cuda.log"
    TRITON_PRINT_AUTOTUNING=1 "$PY" -m jrt.bench.prefill_cuda "${bench_args[@]}" 2>&1 \
        | tee -a "$OUT/prefill_cuda.log"
    bench_status=${PIPESTATUS[0]}
fi
[ "$bench_status" = 0 ] || status=1

if [ "${SKIP_BACKWARD:-0}" != "1" ]; then
    bwd_args=(--lengths "$LENGTHS" --batch "${BATCH:-16}" --heads "${HEADS:-16}" --repeats "${REPEATS:-5}"
              --backward --json "$OUT/prefill_cuda_bwd.json")
    "$PY" -m jrt bench prefill --device cuda "${bwd_args[@]}" 2>&1 | tee "$OUT/prefill_cuda_bwd.log"
    bwd_status=${PIPESTATUS[0]}
    if [ "$bwd_status" != 0 ] && ! grep -q "jrt bench prefill (cuda):" "$OUT/prefill_cuda_bwd.log"; then
        "$PY" -m jrt.bench.prefill_cuda "${bwd_args[@]}" 2>&1 | tee -a "$OUT/prefill_cuda_bwd.log"
        bwd_status=${PIPESTATUS[0]}
    fi
    [ "$bwd_status" = 0 ] || status=1
fi
echo "results in $OUT"
exit "$status"
