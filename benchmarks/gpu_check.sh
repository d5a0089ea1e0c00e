#!/usr/bin/env bash
# The GPU checks, in one run on a machine with a CUDA device and PyTorch (nothing is
# downloaded): tests/test_gpu.py, then `attnlab bench --device cuda` against SDPA and
# FlexAttention. Wheels in .whl/ (transformers, for the backend's tests) are installed
# into /tmp/site first if there are any. Logs go to $OUT (default: ./gpu-out).
#
#   bash benchmarks/gpu_check.sh            # tests, then the benchmark
#   GPU_BENCH_ONLY=1 bash benchmarks/gpu_check.sh
set -u -o pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
nvidia-smi -L
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers',
transformers.__version__, torch.cuda.get_device_name())"
if [ -z "${GPU_BENCH_ONLY:-}" ]; then
    # -v names each failure as it happens: a run cut by the timeout (or the lease) kept
    # only dots and F's of 14 failures, without the summary that names them
    timeout "${GPU_TEST_TIMEOUT:-300}" python3 -m pytest -v -rf -n 12 -p no:cacheprovider \
        tests/test_gpu.py 2>&1 | tee "$OUT/tests.log" | grep -E "FAILED|ERROR|passed|failed" | tail -60
fi
bench() {  # DTYPE N CASES
    timeout "${GPU_BENCH_TIMEOUT:-150}" python3 benchmarks/bench_core.py --device cuda \
        --dtype "$1" --n "$2" --cases "$3" --flex --repeat 20 | tee -a "$OUT/bench.jsonl"
}
bench bfloat16 16384 window,documents,alibi
bench float32 8192 window
