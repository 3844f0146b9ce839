#!/usr/bin/env bash
# A short exploratory GPU session (~2 minutes on an H100): where the fused step's time goes and
# which kernels are fastest for each pass of the grouped convolutions, before a final
# measurement with benchmarks/gpu_session.sh.
#   1. the CUDA tests (parity cases, every CUDA candidate plan under graph replay, gradchecks),
#   2. benchmarks/bench_grouped_conv.py: conv2 at N = 28, 44, 64 and conv3 at N = 64, pass by pass,
#   3. benchmarks/bench_plans.py: every candidate plan at N = 28 and 64 and the fastest one's kernels.
# Run from the repository root:  OUT=/some/dir PYTHONPATH=. bash benchmarks/gpu_explore.sh
source "$(dirname "$0")/gpu_common.sh"
{
environment

stage "pytest: CUDA cases"
timeout 70 python3 -m pytest -q -p no:cacheprovider -k cuda parity tests/test_fused.py tests/test_gradcheck.py 2>&1 | tail -8

stage "bench_grouped_conv: conv2 and conv3, pass by pass"
timeout 40 python3 benchmarks/bench_grouped_conv.py --device cuda --layer 2 --sizes 28 44 64 2>&1
timeout 20 python3 benchmarks/bench_grouped_conv.py --device cuda --layer 3 --sizes 28 64 2>&1

stage "bench_plans: every candidate plan, N = 28 and 64, and the fastest plan's kernels"
timeout 80 python3 benchmarks/bench_plans.py --device cuda --sizes 28 64 --steps 6 --profile 2>&1
stage done
} 2>&1 | tee "$OUT/log.txt"
