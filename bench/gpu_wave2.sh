#!/usr/bin/env bash
# One call on the GPU machine (nvidia-h200: torch 2.11 cu130, transformers 5.17, Python 3.12) for the
# second wave's figures, each part under its own time limit so the whole fits a 10-minute call:
#   decode   torchao and torch_wo decode, batch 1 (bench_decode.py), beside bf16
#   gptq     GPTQ's time to quantize a 1.1B Llama (bench_gptq.py), beside plain rounding
#   tests    the -m gpu tests of torch_wo, torchao and gptq
# From the repository root, carrying .whl (torchao-0.17.0, built for torch 2.11) and .devsite
# (pluggy, attrs, cattrs, bitsandbytes: ../shared/tools/device-site.sh):
#   bash bench/gpu_wave2.sh decode gptq tests
# Results go to $OUT (or bench/_results).
set -uo pipefail
out=${OUT:-bench/_results}
mkdir -p "$out"
export PYTHONPATH=${DEVSITE:-$PWD/.devsite}:$PWD:$PWD/plugins/torch:$PWD/plugins/bitsandbytes:$PWD/plugins/torchao:$PWD/plugins/gptq
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-index ${WHL:-.whl}/torchao-0.17.0-*.whl >/dev/null 2>&1 \
  || echo "torchao wheel install failed (is .whl carried?)"
python3 -m pip install -q --no-deps --no-build-isolation --no-index \
  -e plugins/torch -e plugins/bitsandbytes -e plugins/torchao -e plugins/gptq -e . >/dev/null 2>&1 \
  || echo "pip install -e failed: entry points may be missing"
python3 -c "import torch, torchao, transformers; print('torch', torch.__version__, 'torchao', torchao.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
for part in "$@"; do
  echo "=== $part ($(date +%T))"
  case $part in
    decode) timeout ${T_DECODE:-270} python3 bench/bench_decode.py --device cuda --batch 1 --repeats 1 \
              --methods "${METHODS:-bf16,int4-torch,int4-ao,int8-ao,fp8-ao}" --out "$out/decode_cuda_b1.json" ;;
    gptq) timeout ${T_GPTQ:-130} python3 bench/bench_gptq.py --model llama-1.1b --device cuda --out "$out/gptq_cuda.json" ;;
    tests) timeout ${T_TESTS:-120} python3 -m pytest -q -m gpu --tb=line -p no:cacheprovider -W ignore \
             plugins/torchao/tests plugins/gptq/tests plugins/torch/tests/test_torch_kernels.py \
             plugins/torch/tests/test_torch_modules.py 2>&1 | grep -v MatMul8bitLt | tail -40 ;;
  esac
done
