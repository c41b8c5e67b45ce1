#!/usr/bin/env bash
# The GPU checks of the input path, in one run (docs/input_pipeline.md, "Decoding on the GPU"): for a GPU machine
# with JAX (CUDA), and TensorFlow or not. Run from the repository root:
#
#   benchmarks/gpu_check.sh [OUT_DIR]
#
# nvImageCodec and nvJPEG must be importable (pip install 'nvidia-nvimgcodec-cu13[nvjpeg]', or -cu12 as JAX's
# CUDA); on a machine without a package index, WHEELS=DIR installs the wheels in DIR into a scratch folder first.
# Prints, and writes into OUT_DIR (default /tmp/resnext_jax_gpu_check): the GPU; the decode's agreement with PIL,
# its images/s, and the loop on the device (the train step fed by the decode) against the step alone
# (gpu_decode_benchmark.py; should it fail, again with a buffer per image, RESNEXT_JAX_DECODE_POOL=0); then the
# train step on its own (resnext_jax.benchmark: compile time, TFLOP/s, and torchvision's step in the same run where
# torch is installed). The exit status is 1 if the pooled decode failed or gave other batches in the loop than
# alone. A dry run without a GPU:
# RESNEXT_JAX_DECODE_BACKEND=cpu NUM_IMAGES=8 BATCH_SIZE=4 MODEL=resnext11_4x16d DTYPE=float32 COMPARE_TORCH=0 \
#   benchmarks/gpu_check.sh
set -euo pipefail
out="${1:-/tmp/resnext_jax_gpu_check}"
mkdir -p "$out"
if [[ -n "${WHEELS:-}" ]]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/resnext_jax_site "$WHEELS"/*.whl
  export PYTHONPATH="/tmp/resnext_jax_site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
batch="${BATCH_SIZE:-256}"
(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || echo "no nvidia-smi") | tee "$out/gpu.txt"
model="${MODEL:-resnext50_32x4d}" dtype="${DTYPE:-bfloat16}" steps="${STEPS:-10}"
decode_check() {  # the decode benchmark; $1: where its output goes
  python3 benchmarks/gpu_decode_benchmark.py --num_images "${NUM_IMAGES:-2048}" --batch_size "$batch" \
    --model "$model" --dtype "$dtype" --steps "$steps" 2>&1 | tee "$1"
}
failed=0
# The pooled buffers' views (gpu_decode.decode) have not run on a GPU yet: if they fail, measure the decode with a
# buffer per image (RESNEXT_JAX_DECODE_POOL=0) rather than nothing, and say so in the exit status.
if ! decode_check "$out/decode.json"; then
  failed=1
  echo "gpu_check: the decode benchmark failed with pooled buffers; again with RESNEXT_JAX_DECODE_POOL=0" >&2
  RESNEXT_JAX_DECODE_POOL=0 decode_check "$out/decode_unpooled.json" || true
elif ! tail -n 1 "$out/decode.json" | python3 -c \
    'import json, sys; sys.exit(json.loads(sys.stdin.read()).get("loop_batches_max_abs_diff_vs_alone", 0) != 0)'; then
  failed=1
  echo "gpu_check: the loop's batches differ from the same batches augmented alone: a pooled buffer was reused" \
    "before the programs reading it had run" >&2
fi
compare=""  # torchvision's step beside ours where torch is installed (COMPARE_TORCH=0: not)
if [[ "${COMPARE_TORCH:-1}" == 1 ]] && python3 -c "import torch" 2>/dev/null; then compare=--compare-torch; fi
python3 -m resnext_jax.benchmark --model "$model" --batch-size "$batch" --dtype "$dtype" --steps "$steps" \
  $compare 2>&1 | tail -n 5 | tee "$out/step.txt"
exit "$failed"
