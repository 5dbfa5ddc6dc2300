#!/usr/bin/env bash
# The GPU checks in one device run (a session is lent one GPU for 15 minutes in all): the CUDA tests, the kernels
# timed with the dispatch table written, the pipeline benchmark. Everything it prints and writes lands in $OUT.
#
#   On this machine first (the device machine reaches no package index; its image has everything the package and
#   these tests import but gguf), in the repo root:
#     grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
#     python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#         --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl gguf
#   Then: run(command="bash bench/gpu_session.sh", carry=[".whl"], timeout_s=600)
#
# The first thing it checks is the one no CPU can: the PRMT decoders (kernels/triton/float_bits.py) against the
# reference, bit for bit, in tests/test_triton_kernels.py on CUDA tensors. Results to commit under bench/results/
# come back as $OUT/kernels-<GPU>.csv and the logs; the measured dispatch table as $OUT/dispatch-*.json; the static
# model's error against the timings as $OUT/model-error.md (bench.model_error, from the committed sass-sm90.json).
set -o pipefail
OUT=${OUT:-bench-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 XDG_CACHE_HOME="$OUT/cache"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="/tmp/site:$PWD" || exit 1
else
    export PYTHONPATH="$PWD"
fi
python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: nothing to check here')" \
    || exit 2
{ nvidia-smi; python3 -c "import torch, triton; print(torch.__version__, triton.__version__)"; } > "$OUT/gpu.txt" 2>&1

timeout 240 python3 -m pytest -q -x -n 8 -p no:cacheprovider tests/test_triton_kernels.py tests/test_float_bits.py \
    tests/test_custom_op.py tests/test_streaming.py tests/test_memory_plan.py 2>&1 \
    | tee "$OUT/cuda-tests.log" || { echo "CUDA tests failed: see cuda-tests.log"; exit 1; }
timeout 240 python3 -m bench.kernels --write-dispatch --repeats 10 --csv "$OUT/kernels.csv" 2>&1 \
    | tee "$OUT/kernels.md"
find "$OUT/cache" -name '*.json' -exec cp {} "$OUT/" \;
python3 -m bench.model_error --csv "$OUT/kernels.csv" 2>&1 | tee "$OUT/model-error.md"
timeout 90 python3 -m bench.pipeline 2>&1 | tee "$OUT/pipeline.md"
