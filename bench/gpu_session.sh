#!/usr/bin/env bash
# Every GPU measurement of this project in one run, for a GPU machine lent for a few minutes:
#   1. bench.gpu_mfu: train-step MFU at d = 1024, sequence 1024, bf16, cuDNN attention (IMPLS=auto,xla
#      adds XLA's for contrast); the forward pass and decode tokens/s of that model (section gpu_mfu
#      of bench/RESULTS.md);
#   2. the GPU path of the tests: cuDNN attention against the plain implementation, generation
#      (tests/test_attention.py, test_generate.py; TESTS_K selects);
#   3. bench.generate --speed-only on a trained Shakespeare preset run: decode tokens/s, fixed R with
#      each cache, per-token exit, recompute (section generate_gpu), when RUN (default
#      runs/shakespeare) holds one; R_SMALL and THRESHOLD as the CPU run's quality study chose them.
# Prepare here: `make gpu-wheels` (packages the GPU image lacks, into .whl/) and a trained preset run
# (`python -m train --config configs/lm_shakespeare.py --workdir runs/shakespeare`, 13 minutes on 2
# CPU cores; its latest checkpoint is enough). On the GPU machine, from the repository root, carrying
# .whl, data/shakespeare and runs/shakespeare:  OUT=/some/dir bash bench/gpu_session.sh
# Logs and the updated bench/RESULTS.md land in $OUT (default bench/gpu_out). Each step has its own
# time limit (seconds: MFU_S, MFU_XLA_S, TESTS_S, GENERATE_S; 8 minutes in all, 10 with the XLA
# fallback) so that one slow step does not take the others' time; a step cut off leaves the rows it
# printed in its log.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/gpu_out}
RUN=${RUN:-runs/shakespeare}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled
$PY -c "import jax, flax, optax, orbax.checkpoint; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())" \
    2>&1 | tee "$OUT/versions.log"

step() {  # step NAME SECONDS COMMAND...: run it under a time limit, its output into $OUT/NAME.log
  local name=$1 seconds=$2; shift 2
  echo "== $name (at most ${seconds} s): $*"
  timeout "$seconds" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc"
  return "$rc"
}

# cuDNN attention; should it fail (a jax version that handles it otherwise), XLA's, for an MFU figure
step gpu_mfu "${MFU_S:-210}" $PY -m bench.gpu_mfu --impls "${IMPLS:-auto}" \
    || step gpu_mfu_xla "${MFU_XLA_S:-120}" $PY -m bench.gpu_mfu --impls xla
# float32 matmuls at full precision (a GPU may use TF32 for them): the tests compare implementations
# to 1e-5; the benchmarks above run at the default precision.
JAX_DEFAULT_MATMUL_PRECISION=highest step tests "${TESTS_S:-100}" $PY -m pytest -q --maxfail=5 \
    -p no:cacheprovider tests/test_attention.py tests/test_generate.py -k "${TESTS_K:-not cli and not raven}"
if [ -f "$RUN/config.json" ]; then
  # decode speed only, with the R_small and threshold that the CPU run's quality study chose
  step generate "${GENERATE_S:-160}" $PY -m bench.generate --workdir "$RUN" --speed-only \
      --r-small "${R_SMALL:-2}" --threshold "${THRESHOLD:-0.3}" --section generate_gpu
else
  echo "== generate: skipped ($RUN holds no run)"
fi
cp bench/RESULTS.md "$OUT/"
