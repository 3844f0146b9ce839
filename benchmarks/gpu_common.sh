# What the lent-device scripts share (sourced by gpu_session.sh and gpu_explore.sh): $OUT made,
# unbuffered Python on the repository, `stage` (a timestamped heading), `clean` (progress bars
# out of a log) and `environment` (the GPU, torch and cuDNN).
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}  # the repository first, whatever was set
start=$(date +%s)
stage() { echo; echo "=== [$(( $(date +%s) - start ))s] $*"; }
clean() { tr '\r' '\n' | grep -v -E '^\s*$|(it|img|batch)/s\]$'; }
environment() {
  stage environment
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv
  python3 -c "import torch; print('torch', torch.__version__, 'cudnn', torch.backends.cudnn.version(), torch.cuda.get_device_name())"
}
