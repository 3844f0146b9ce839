#!/usr/bin/env bash
# The GPU checks of one lent-device session, in one call (~8 minutes on an H100, at most 9.5; every stage
# has its own time limit and the script goes on when one fails):
#   1. the parity suite's CUDA cases, the CUDA tests of the fused trainer, the lanes and both cnn_train ports (every CUDA
#      candidate plan under graph replay against the CPU; trainers on CUDA streams),
#   2. benchmarks/bench_compose.py at N = 36 and 64 (the composed conv3 -> conv4: GEMM vs cuDNN),
#   3. the largest slice of `--preset paper` that fits: 16 masks x 10 sizes x 5 epochs x full MNIST
#      (epoch 1 also captures graphs and searches cuDNN algorithms; after epoch 3, models whose
#      scores went NaN in epoch 1 stop, and epoch 4 recaptures: epoch 5 is the steady state), and the projection
#      from it (benchmarks/project_grid.py),
#   4. benchmarks/bench_search.py: the search's path vs 16 naive LeNets, N = 28 and 64, if time is left.
# (bench_lanes.py -- --lanes stays 1: 1.10x at best -- and bench_plans.py --profile ran in earlier sessions.)
# Everything printed goes to $OUT/log.txt (the tails of long outputs); pytest's whole output and the
# slice's (its progress bars left out), the slice's results.csv, summary.md and autotune.json and the benchmark JSON are copied next
# to it (seven files: the device tool returns at most eight).
# benchmarks/gpu_explore.sh is the shorter look at single kernels that came before this.
# Run from the repository root:  OUT=/some/dir PYTHONPATH=. bash benchmarks/gpu_session.sh
source "$(dirname "$0")/gpu_common.sh"
{
environment

stage "pytest: CUDA parity, fused-trainer and cnn_train cases"
timeout 60 python3 -m pytest -q -rfE --tb=short -p no:cacheprovider -k cuda parity tests/test_fused.py tests/test_lanes.py \
  tests/test_train.py tests/test_train_dag.py tests/test_nan_semantics.py 2>&1 | tee "$OUT/pytest.log" | tail -12

stage "bench_compose: conv3 -> conv4 composed by GEMM or by cuDNN"
timeout 25 python3 benchmarks/bench_compose.py --device cuda --sizes 36 64 --models 8 --repeats 5 2>&1 | tail -4

stage "paper slice: 16 masks x N=28..64 x 5 epochs x 60000/10000 images x 1 seed"
rm -rf /tmp/paper_slice  # a warm machine's earlier slice would be resumed, its plans reused: nothing measured
timeout 405 python3 -m matconvnet_port.search --preset paper --seeds 1 --epochs 5 --device cuda \
  --out /tmp/paper_slice 2>&1 | clean | grep -v '^grid:' | tee "$OUT/paper_slice.log" | tail -40
cp /tmp/paper_slice/results.csv "$OUT/paper_slice_results.csv"
cp /tmp/paper_slice/summary.md "$OUT/paper_slice_summary.md"
cp /tmp/paper_slice/autotune.json "$OUT/paper_slice_autotune.json"
python3 benchmarks/project_grid.py /tmp/paper_slice/results.csv

stage "bench_search (ours vs naive, N = 28 and 64)"
timeout 70 python3 benchmarks/bench_search.py --device cuda --sizes 28 64 --images 10000 \
  --json "$OUT/bench_search_cuda.json" 2>&1 | clean | tail -8
stage done
} 2>&1 | tee "$OUT/log.txt"
