set -uo pipefail
export PYTHONPATH="$PWD" HF_HUB_OFFLINE=1
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr 'A-Z ' 'a-z-')
t0=$(date +%s)
timeout 200 python3 -m bench.triton_attention_ceiling --out "$OUT/triton_attention_ceiling-$gpu.json" > $OUT/ceiling.log 2>&1; echo "rc $?"; tail -14 $OUT/ceiling.log | cut -c1-170
echo "ceiling $(( $(date +%s) - t0 )) s"
timeout 150 python3 -m bench.sweep_prefill_attention --out "$OUT/sweep_prefill_attention-$gpu.json" 2>&1 | tail -4
timeout 150 python3 -m bench.sweep_decode_attention --out "$OUT/sweep_decode_attention-$gpu.json" 2>&1 | tail -4
echo "sweeps $(( $(date +%s) - t0 )) s"
timeout 150 python3 -m bench.gpu_kernels 2>&1 | tail -12
cp bench/results/gpu_kernels-*.json $OUT/
echo "all $(( $(date +%s) - t0 )) s"
