#!/usr/bin/env bash
# The GPU machine's runs for the second wave (nvidia-h100-x1, the issues' card, or nvidia-h200:
# torch 2.11 cu130, transformers 5.17, Python 3.12), each part under its own time limit so that a
# few parts fit one 10-minute call:
#   tests     the -m gpu tests of torch_wo, torchao and gptq (log: $OUT/tests.log);
#             tests-ao, tests-torch, tests-fusion, tests-gptq: one part (PYTEST_K: pytest -k)
#   kernels   one layer at a time, CUDA-graph replays (bench_kernels.py)
#   gemv      batch-1 kernels on weights streamed from HBM, config by config (int4: the byte and
#             interleaved kernels, tinygemm), and a step's linears in one graph (bench_gemv.py;
#             GEMV_ARGS adds arguments, e.g. "--formats int4 --fused", or "--formats int8
#             --wide-int8" for a wider int8 grid, num_stages included, or "--formats int4 --dot"
#             for the tl.dot kernels on the one row, tensor cores, beside the one-row kernels;
#             "--only tinygemm,interleaved" times those cases alone; "--wide-int4" sweeps the
#             interleaved kernel over a wider grid of configs, prefetch included; "--no-shapes
#             --stack-methods A,B,A,B" times those stacks alone, in that order)
#   launch    one layer at a time, back-to-back eager calls: what an eager step pays per layer
#   decode    bench_decode.py (METHODS, MODES, MODEL, BATCH, REPEATS narrow it); eager in rounds
#   profile   profile_decode.py: a compiled step's kernels (PROFILE_METHODS, MODEL)
#   eager-profile  profile_eager.py: an eager step's host time, kernel time and Python hot spots
#             (EAGER_ARGS adds arguments: "--prefill --steps 5" profiles the prompt's prefill)
#   bound     bound_decode.py: a compiled step without the rotary embedding and cache writes, the
#             norms, the attention, or with linears that only read their bytes (BOUND_METHODS,
#             CUTS, e.g. "linears,linears+norms+adds"): what folds or faster kernels could save at most
#   attention the decode attention's split configs against SDPA, a step's caches in one graph
#             (bench_attention.py; ATTENTION_ARGS adds arguments, e.g. "--configs 32x4,64x4")
#   gptq      GPTQ's time to quantize a 1.1B Llama (bench_gptq.py), beside plain rounding
#   check-fold  whether fuse_projections(norms=True) folds in a compiled step (check_fold.py;
#             FOLD_METHOD: another bench_decode method, e.g. int8-torch+glu+rope+norms)
#   dequant   the prefill path's dequantize: Triton kernel, packing's ops, the fp32 formula
#   decode-quality  SmolLM2-135M's perplexity on Hamlet through the decode path, eager and compiled,
#             beside one window (decode_quality.py; QUALITY_METHODS). Needs the model, which
#             travels in two calls to one machine held warm: `python bench/smollm2_parts.py pack`
#             here, carry .smol/a in one call and .smol/b in the next (this part), and .devsite
#             built with gguf (`bash ../shared/tools/device-site.sh gguf==0.19.0`)
# From the repository root, carrying .whl (torchao-0.17.0, built for torch 2.11) and .devsite
# (pluggy, attrs, cattrs, bitsandbytes: ../shared/tools/device-site.sh):
#   bash bench/gpu_wave2.sh tests launch decode
# Results go to $OUT (or bench/_results).
set -uo pipefail
out=${OUT:-bench/_results}
mkdir -p "$out"
export PYTHONPATH=${DEVSITE:-$PWD/.devsite}:$PWD:$PWD/plugins/torch:$PWD/plugins/bitsandbytes:$PWD/plugins/torchao:$PWD/plugins/gptq
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 -m pip install -q --no-deps --no-index ${WHL:-.whl}/torchao-0.17.0-*.whl >/dev/null 2>&1 \
  || echo "torchao wheel install failed (is .whl carried?)"
python3 -m pip install -q --no-deps --no-build-isolation --no-index \
  -e plugins/torch -e plugins/bitsandbytes -e plugins/torchao -e plugins/gptq -e . >/dev/null 2>&1 \
  || echo "pip install -e failed: entry points may be missing"
python3 -c "import torch, triton, torchao, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'torchao', torchao.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
model=${MODEL:-llama-1.1b}
for part in "$@"; do
  echo "=== $part ($(date +%T))"
  case $part in
    tests|tests-ao|tests-torch|tests-fusion|tests-gptq)
      # SIGINT: a run cut short by its limit still prints its failures.
      case $part in tests-ao) paths=plugins/torchao/tests ;; tests-gptq) paths=plugins/gptq/tests ;;
        tests-torch) paths="plugins/torch/tests/test_torch_kernels.py plugins/torch/tests/test_torch_modules.py plugins/torch/tests/test_torch_fusion.py" ;;
        tests-fusion) paths=plugins/torch/tests/test_torch_fusion.py ;;
        *) paths="plugins/torchao/tests plugins/gptq/tests plugins/torch/tests/test_torch_kernels.py plugins/torch/tests/test_torch_modules.py plugins/torch/tests/test_torch_fusion.py" ;;
      esac
      timeout -s INT ${T_TESTS:-170} python3 -m pytest -q -m gpu -rf --tb=short -p no:cacheprovider -W ignore ${PYTEST_K:+-k "$PYTEST_K"} $paths 2>&1 \
        | grep -v MatMul8bitLt > "$out/$part.log"
      grep -E "passed|failed|error" "$out/$part.log" | tail -2; grep -E "^(FAILED|ERROR|E  )" "$out/$part.log" | head -40 ;;
    kernels) timeout ${T_KERNELS:-60} python3 bench/bench_kernels.py --out "$out/kernels_cuda.json" ;;
    gemv) timeout ${T_GEMV:-240} python3 bench/bench_gemv.py --model "$model" --stack ${GEMV_ARGS:-} \
            --out "$out/gemv_${model}.json" ;;
    launch) timeout ${T_LAUNCH:-40} python3 bench/bench_kernels.py --eager --batch 1 --out "$out/kernels_cuda_eager.json" ;;
    decode) TORCH_LOGS=${TORCH_LOGS:-perf_hints} timeout ${T_DECODE:-270} python3 bench/bench_decode.py --device cuda \
              --model "$model" --batch "${BATCH:-1}" --repeats "${REPEATS:-2}" --modes "${MODES:-eager,compiled}" \
              --method-timeout "${METHOD_TIMEOUT:-0}" $(case ${MODES:-eager} in *eager*) echo --interleave-eager ;; esac) --methods "${METHODS:-bf16,int4-torch,int8-torch,int4-ao,int8-ao,fp8-ao}" \
              --out "$out/decode_${model}_b${BATCH:-1}.json" 2>&1 \
              | grep -v -E "FutureWarning|forward_call|MatMul8bitLt" ;;
    profile) timeout ${T_PROFILE:-240} python3 bench/profile_decode.py --model "$model" \
               --method-timeout "${METHOD_TIMEOUT:-0}" --methods "${PROFILE_METHODS:-bf16,int8-torch,int4-torch,int4-ao}" \
               --out "$out/profile_${model}.json" 2>&1 | grep -v -E "FutureWarning|forward_call" ;;
    eager-profile) timeout ${T_PROFILE:-200} python3 bench/profile_eager.py --model "$model" ${EAGER_ARGS:-} \
               --methods "${PROFILE_METHODS:-bf16,int8-torch,int8-torch+fused,int4-torch,int4-torch+fused}" \
               --out "$out/profile_eager_${model}.json" 2>&1 | grep -v -E "FutureWarning|forward_call" ;;
    bound) timeout ${T_BOUND:-300} python3 bench/bound_decode.py --model "$model" \
             --methods "${BOUND_METHODS:-bf16,int4-torch@interleaved+glu}" --cuts "${CUTS:-rope-kv,norms,rope-kv+norms}" \
             --out "$out/bound_${model}.json" 2>&1 | grep -v -E "FutureWarning|forward_call" ;;
    dequant) timeout ${T_DEQUANT:-60} python3 bench/bench_dequantize.py --device cuda --out "$out/dequant_cuda.json" ;;
    attention) timeout ${T_ATTENTION:-120} python3 bench/bench_attention.py ${ATTENTION_ARGS:-} --out "$out/attention.json" ;;
    gptq) timeout ${T_GPTQ:-130} python3 bench/bench_gptq.py --model llama-1.1b --device cuda --out "$out/gptq_cuda.json" ;;
    decode-quality)
      if smol=$(python3 bench/smollm2_parts.py join); then
        eval "$smol"
        QUANTCORE_BENCH_DATA=/tmp/bench_data timeout ${T_PREPARE:-150} python3 bench/prepare_models.py 2>&1 | grep -E "perplexity|Error|error" | tail -3
        QUANTCORE_BENCH_DATA=/tmp/bench_data timeout ${T_QUALITY:-450} python3 bench/decode_quality.py --device cuda --compiled \
          --methods "${QUALITY_METHODS:-bf16,int8-torch+glu+rope+norms,int4-torch+group=64+glu+rope+norms}" \
          --out "$out/decode_quality_cuda.json" 2>&1 | grep -v -E "Warning|warnings.warn|W[0-9]{4} |forward_call"
      fi ;;
    check-fold) timeout ${T_CHECK:-150} python3 bench/check_fold.py ${FOLD_METHOD:+--method "$FOLD_METHOD"} 2>&1 | grep -v -E "Warning|warnings.warn" ;;
  esac
done
echo "=== done ($(date +%T))"
