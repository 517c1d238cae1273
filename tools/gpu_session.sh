#!/usr/bin/env bash
# The GPU checks of issue 3 in one call on a lent GPU, about 5 minutes on one H200 (docs/speed.md):
#   G: the defaults (stacked members on CUDA) at 2,600 rows, with the operation counts and figures 1-2;
#   H: the same rows one member at a time (`--stack-members 1`), side by side with G;
#   I: online mode, stacked, at 5,200 rows.
# Each run writes its JSON into OUT (default: $OUT, else gpu_results/) and is cut off after its own
# time limit, so one failure does not take the others' time. Needs torch with CUDA, transformers,
# peft, numpy, loguru and tqdm (`pip install -e .` of this repo brings them). GPU_CHECK_EXTRA is
# appended to every run's arguments: `GPU_CHECK_EXTRA="--tiny --examples 64" bash tools/gpu_session.sh`
# is a smoke test of the script on a CPU, in seconds.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-gpu_results}}
mkdir -p "$out"
python=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv > "$out/gpu.txt" 2>&1
"$python" -c "import platform, torch, transformers, peft; print('python', platform.python_version(), 'torch', \
torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)" >> "$out/gpu.txt" 2>&1
run() {  # name, seconds, gpu_check arguments...
    local name=$1 limit=$2
    shift 2
    echo "== $name: gpu_check $* (limit ${limit}s)"
    timeout "$limit" "$python" tools/gpu_check.py "$@" ${GPU_CHECK_EXTRA:-} --out "$out/$name.json" > "$out/$name.txt" 2> "$out/$name.log"
    echo "exit $?"
    tail -n 25 "$out/$name.txt"
}
run G_stacked_2600 120 --examples 2600 --stack-members 4 --count-ops
run H_one_at_a_time_2600 170 --examples 2600 --stack-members 1 --micro-rounds 0
run I_online_stacked_5200 120 --examples 5200 --stack-members 4 --score-mode online --micro-rounds 0
