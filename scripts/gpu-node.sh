#!/bin/sh
# A Ray worker node on a GPU host: CUDA MPS first, then `ray start` with this script's arguments.
#
#   gpu-node.sh --address=ray-head:6379 --block      (docker-compose.yml's ray-worker; docs/deploy.md)
#
# Trials that share a GPU (`"gpu": 0.25` in a spec) are separate processes. Without MPS the GPU runs
# one process's kernels at a time (time slices), so four small trials fill only the gaps a single
# trial leaves; under MPS their kernels run side by side. On an H200, four W1A1 trials of Model A
# gave 2.35x the images/s of one by time slicing and 4.35x under MPS (BENCHMARKS.md, "GPU").
#
# The MPS control daemon starts when BITBENCH_CUDA_MPS is not 0, `nvidia-cuda-mps-control` is on the
# PATH (the NVIDIA runtime mounts it with the `compute` driver capability) and `nvidia-smi -L` lists
# a GPU. If it cannot start, the node starts anyway with time slicing and says so. Ray's worker
# processes inherit CUDA_MPS_PIPE_DIRECTORY from here: every trial on this node is an MPS client.
set -eu

start_mps() {  # sets $mps to "on (…)" or "off (why)"
    if [ "${BITBENCH_CUDA_MPS:-1}" = 0 ]; then
        mps="off (BITBENCH_CUDA_MPS=0)"
    elif ! command -v nvidia-cuda-mps-control >/dev/null 2>&1; then
        mps="off (no nvidia-cuda-mps-control: is the compute driver capability given?)"
    elif ! nvidia-smi -L >/dev/null 2>&1; then
        mps="off (nvidia-smi lists no GPU)"
    else
        export CUDA_MPS_PIPE_DIRECTORY="${CUDA_MPS_PIPE_DIRECTORY:-/tmp/nvidia-mps}"
        export CUDA_MPS_LOG_DIRECTORY="${CUDA_MPS_LOG_DIRECTORY:-/tmp/nvidia-mps-log}"
        mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
        if nvidia-cuda-mps-control -d </dev/null >/dev/null 2>&1; then
            mps="on (pipe $CUDA_MPS_PIPE_DIRECTORY): trials sharing a GPU run side by side"
        else
            unset CUDA_MPS_PIPE_DIRECTORY
            mps="off (the MPS control daemon did not start: see $CUDA_MPS_LOG_DIRECTORY/control.log)"
        fi
    fi
}

start_mps
echo "gpu-node: CUDA MPS $mps" >&2
exec ray start "$@"
