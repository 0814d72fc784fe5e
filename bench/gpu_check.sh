#!/usr/bin/env bash
# Every check that needs a GPU, in one go, for a borrowed GPU machine with a limited lease:
#
#   bash bench/gpu_check.sh OUT_DIR [BUDGET_S]
#
# 1. the card (nvidia-smi), python and torch;
# 2. the CUDA tests (those the suite skips without a GPU; CUDA-graph training among them);
# 3. bench/gpu.py: images/s with 1, 2 and 4 trials sharing the GPU (records bench/gpu_figures.json);
# 4. bench/gpu_step.py: a CIFAR-10-shaped epoch of Model A taken apart (variants, kernels per step, bit widths);
# 5. with time left, 4 trials sharing the GPU again under CUDA MPS (kernels of several processes at once).
#
# Each step's output goes to OUT_DIR/<step>.log as it runs; a step that fails does not stop the others.
# Python packages the machine lacks may lie as wheels in .whl/ (installed into /tmp/site first).
set -u
out=${1:?usage: bash bench/gpu_check.sh OUT_DIR [BUDGET_S]}
budget=${2:-480}
mkdir -p "$out"
start=$SECONDS
left() { echo $((budget - (SECONDS - start))); }
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}

if compgen -G ".whl/*.whl" >/dev/null; then
    $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

{
    nvidia-smi -L; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    $py -c "import sys, torch; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda)"
    nproc
} >"$out/machine.log" 2>&1
if ! $py -c "import workers.train, workers.spec" 2>"$out/imports.log"; then
    tail -n 30 "$out/imports.log"; exit 3  # nothing below can run: say why at once
fi

CUDA_TESTS=()  # service's app needs plotly: a machine without it runs the rest
$py -c "import plotly" 2>/dev/null && CUDA_TESTS=(tests/test_gpu_device.py::test_a_gpu_trial_with_cuda_trains_on_it)
CUDA_TESTS+=(
    tests/test_datasets.py::test_cuda_tensors_and_generator
    tests/test_imagenet.py::test_cuda_batches_with_a_cuda_generator
    tests/test_trial_memory.py::test_cuda_memory_returns_to_where_it_was_after_a_trial_and_after_a_failed_attempt
    tests/test_fused_minw.py::test_on_cuda_the_fast_paths_match_the_composed_reference
    tests/test_cuda_graphs.py
)
CUBLAS_WORKSPACE_CONFIG=:4096:8 timeout 150 $py -m pytest -p no:cacheprovider -q -rA "${CUDA_TESTS[@]}" >"$out/cuda_tests.log" 2>&1
echo "cuda tests: exit $? ($((SECONDS - start)) s)" >>"$out/machine.log"

timeout $(( $(left) > 200 ? 180 : $(left) / 2 )) $py bench/gpu.py --budget-s 150 >"$out/gpu.log" 2>&1
echo "gpu.py: exit $? ($((SECONDS - start)) s)" >>"$out/machine.log"
[ -f bench/gpu_figures.json ] && cp bench/gpu_figures.json "$out/"

step_budget=$(( $(left) - 90 ))
if [ "$step_budget" -gt 30 ]; then
    timeout $((step_budget + 60)) $py bench/gpu_step.py --skip-compile --budget-s "$step_budget" >"$out/gpu_step.log" 2>&1
    echo "gpu_step.py: exit $? ($((SECONDS - start)) s)" >>"$out/machine.log"
fi

if [ "$(left)" -gt 50 ] && command -v nvidia-cuda-mps-control >/dev/null; then
    export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
    mkdir -p /tmp/mps-pipe /tmp/mps-log
    if nvidia-cuda-mps-control -d; then
        timeout $(( $(left) - 5 )) $py bench/gpu.py --shares 1 4 --budget-s 20 --record /tmp/mps_figures.json \
            >"$out/gpu_mps.log" 2>&1
        echo "gpu.py under MPS: exit $? ($((SECONDS - start)) s)" >>"$out/machine.log"
        echo quit | nvidia-cuda-mps-control
    fi
fi
echo "done in $((SECONDS - start)) s" >>"$out/machine.log"
tail -n 40 "$out"/*.log
