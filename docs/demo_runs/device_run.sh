#!/bin/bash
# One device run: the demo's five seeds (full run, then the fair ablation) on 2 pinned cores each,
# while the GPU check runs the 7B recipe and the 24 GB recipe against fit.py's predictions.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
T0=$(date +%s)
mkdir -p /tmp/demo
lscpu | grep -E "Model name|^CPU\(s\)" > /tmp/demo/cpu.txt
for s in 0 1 2 3 4; do
  ( c="$((2*s)),$((2*s+1))"
    a=$(date +%s); taskset -c $c timeout 420 python3 demo.py --seed $s --out /tmp/demo/d$s --threads 2 > /tmp/demo/demo$s.log 2>&1
    echo "seed $s demo exit $? wall $(( $(date +%s) - a )) s" >> /tmp/demo/times.txt
    a=$(date +%s); taskset -c $c timeout $(( 560 - ($(date +%s) - T0) )) python3 demo.py --ablation --seed $s --out /tmp/demo/d$s --threads 2 >> /tmp/demo/demo$s.log 2>&1
    echo "seed $s ablation exit $? wall $(( $(date +%s) - a )) s" >> /tmp/demo/times.txt ) &
done
taskset -c 12-15 timeout 300 python3 scripts/gpu_check.py --predicted docs/fit/qwen2.5-vl-7b-b8.json --work /tmp/g7 > $OUT/gpu_7b.log 2>&1
echo "gpu 7b exit $?" >> $OUT/gpu_7b.log; rm -rf /tmp/g7
taskset -c 12-15 timeout $(( 560 - ($(date +%s) - T0) )) python3 scripts/gpu_check.py --config qwen3-vl-4b -B 4 -K 6 --max-pixels 262144 --micro-batch 2 --predicted docs/fit/qwen3-vl-4b-24gb.json --work /tmp/g4 > $OUT/gpu_4b.log 2>&1
echo "gpu 4b exit $?" >> $OUT/gpu_4b.log
while [ $(( $(date +%s) - T0 )) -lt 565 ] && [ -n "$(jobs -rp)" ]; do sleep 2; done
cd /tmp/demo && tar czf $OUT/demo.tgz cpu.txt times.txt demo*.log d*/summary.json d0/report.html 2>/dev/null
ls -la $OUT
