#!/usr/bin/env bash
# What ran on the GPU machine for issue 15 (nvidia-h200: torch 2.11 cu130, transformers 5.17),
# from the repository root, with .devsite (bitsandbytes, pluggy, attrs, cattrs) carried along:
#   bash bench/gpu_issue15.sh PART...   (PART: tests | kernels | decode1 | decode16; METHODS=a,b to narrow)
# DEVSITE points at .devsite when it is not in the current folder. bitsandbytes' int8 prints one
# "MatMul8bitLt: inputs will be cast" line per call: the parts filter it out where they can.
# Results go to $OUT (or bench/_results).
set -uo pipefail
out=${OUT:-bench/_results}
mkdir -p "$out"
export PYTHONPATH=${DEVSITE:-$PWD/.devsite}:$PWD:$PWD/plugins/torch:$PWD/plugins/bitsandbytes
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e plugins/torch -e plugins/bitsandbytes -e . >/dev/null 2>&1 \
  || echo "pip install -e failed: entry points may be missing"
for part in "$@"; do
  case $part in
    tests) timeout 170 python3 -m pytest -q -m gpu --tb=short -p no:cacheprovider -W ignore plugins/torch/tests/test_torch_kernels.py \
             plugins/torch/tests/test_torch_modules.py plugins/bitsandbytes/tests/test_bnb_compile.py 2>&1 | grep -v MatMul8bitLt | tail -60 ;;
    kernels) timeout 80 python3 bench/bench_kernels.py --out "$out/kernels_cuda.json" ;;
    decode1) timeout ${T:-320} python3 bench/bench_decode.py --device cuda --batch 1 --repeats 2 \
               --methods "${METHODS:-bf16,int8-torch,int4-torch,int4-torch@tinygemm,nf4,int8}" --out "$out/decode_cuda_b1.json" ;;
    decode16) timeout ${T:-420} python3 bench/bench_decode.py --device cuda --batch 16 --repeats 2 \
               --methods "${METHODS:-bf16,int4-torch,int8-torch,nf4,int8}" --out "$out/decode_cuda_b16.json" ;;
  esac
done
