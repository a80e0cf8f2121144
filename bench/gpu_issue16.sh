#!/usr/bin/env bash
# The torchao GPU runs of issue 16 (nvidia-h200: torch 2.11 cu130, transformers 5.17, Python 3.12),
# from the repository root, with .whl (torchao-0.17.0, the release built for torch 2.11) and
# .devsite (pluggy, attrs, cattrs: see bench/gpu_issue15.sh) carried along:
#   bash bench/gpu_issue16.sh PART...   (PART: tests | decode1 | decode16)
# decode* need bench/bench_decode.py (issue 15). Results go to $OUT (or bench/_results).
set -uo pipefail
out=${OUT:-bench/_results}
mkdir -p "$out"
export PYTHONPATH=$PWD/.devsite:$PWD:$PWD/plugins/torch:$PWD/plugins/bitsandbytes:$PWD/plugins/torchao
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-index .whl/torchao-0.17.0-*.whl >/dev/null 2>&1 \
  || echo "torchao wheel install failed (is .whl carried?)"
python3 -m pip install -q --no-deps --no-build-isolation --no-index \
  -e plugins/torch -e plugins/bitsandbytes -e plugins/torchao -e . >/dev/null 2>&1 \
  || echo "pip install -e failed: entry points may be missing"
python3 -c "import torch, torchao; print('torch', torch.__version__, 'torchao', torchao.__version__)"
for part in "$@"; do
  case $part in
    tests) timeout 400 python3 -m pytest -q -p no:cacheprovider plugins/torchao/tests 2>&1 | tail -25 ;;
    decode1) timeout 500 python3 bench/bench_decode.py --device cuda --batch 1 --repeats 2 \
               --methods "${METHODS:-bf16,int4-ao,int8-ao,fp8-ao,int4-torch}" --out "$out/decode_ao_cuda_b1.json" ;;
    decode16) timeout 500 python3 bench/bench_decode.py --device cuda --batch 16 --repeats 2 \
               --methods "${METHODS:-bf16,int4-ao,int8-ao,fp8-ao}" --out "$out/decode_ao_cuda_b16.json" ;;
  esac
done
