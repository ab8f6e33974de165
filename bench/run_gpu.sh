#!/usr/bin/env bash
# One device-machine run: GPU tests, then the benchmarks; logs and result JSON go to $OUT.
#   (on the GPU host, repo root)  source .devpkgs/setup.sh && bash bench/run_gpu.sh [tests|bench|engine|all]
set -uo pipefail
OUT="${OUT:-/tmp/diptych-out}"; mkdir -p "$OUT"
what="${1:-all}"
# Wheels the host image lacks beyond the bundle (gguf: the loader imports it).
ls .devpkgs/extra/*.whl >/dev/null 2>&1 && python3 -m pip install -q --no-index --no-deps --target /tmp/site .devpkgs/extra/*.whl
# The checkout is not installed here: diptych.<folder> is read through a tree of links (as make typecheck does).
links=/tmp/diptych-links/diptych; mkdir -p "$links"
for d in engine kernels prefill decode router cluster; do ln -sfn "$PWD/$d" "$links/$d"; done
export PYTHONPATH="/tmp/diptych-links:$PWD${PYTHONPATH:+:$PYTHONPATH}" RAY_USAGE_STATS_ENABLED=0 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv | tee "$OUT/gpus.txt"
if [ "$what" = engine ]; then  # the single-GPU figures of the README: kernels and the engine step
  python3 -m pytest -c /dev/null --rootdir . -p no:cacheprovider -m gpu -q -rfE tests/test_model_gpu.py 2>&1 | tail -3
  timeout 200 python3 -m bench.gpu_kernels 2>&1 | tee "$OUT/gpu_kernels.log" | tail -15
  timeout 300 python3 -m bench.gpu_engine 2>&1 | tee "$OUT/gpu_engine.log" | tail -15
  cp bench/results/gpu_*.json "$OUT/" 2>/dev/null
  exit 0
fi
if [ "$what" != bench ]; then
  python3 -m pytest -c /dev/null --rootdir . -p no:cacheprovider -m gpu -q -x -rfE \
    tests/test_disagg_gpu.py tests/test_model_gpu.py tests/test_cuda_graphs.py tests/test_sampler.py tests/test_kv_transfer.py tests/kernels 2>&1 | tee "$OUT/gpu-tests.log" | tail -25
fi
if [ "$what" != tests ]; then
  gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr 'A-Z ' 'a-z-')
  timeout 200 python3 -m bench.sweep_prefill_attention --out "$OUT/sweep_prefill_attention-$gpu.json" 2>&1 | tail -8
  timeout 200 python3 -m bench.sweep_decode_attention --out "$OUT/sweep_decode_attention-$gpu.json" 2>&1 | tail -8
  timeout 400 python3 -m bench.triton_attention_ceiling --out "$OUT/triton_attention_ceiling-$gpu.json" 2>&1 | tail -15
  timeout 200 python3 -m bench.gpu_kernels 2>&1 | tee "$OUT/gpu_kernels.log" | tail -15
  timeout 300 python3 -m bench.gpu_engine 2>&1 | tee "$OUT/gpu_engine.log" | tail -15
  timeout 150 python3 -m bench.kv_transfer 2>&1 | tee "$OUT/kv_transfer.log" | tail -15
  timeout 300 python3 -m bench.disagg_serving --requests 24 --rate 2 2>&1 | tee "$OUT/disagg_serving.log" | grep -v "^INFO\|(pid=" | tail -25
  cp bench/results/*.json "$OUT/" 2>/dev/null
fi
