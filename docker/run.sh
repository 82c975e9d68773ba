#!/bin/bash
# Run cfgen (or, with ENTRYPOINT=accelerate, accelerate) in the CUDA image with what a bring-your-own
# recipe needs: runs/, weights/, data/ and pipelines/ of the current directory mounted where the
# recipes' relative paths point (/app/...), the calling user's uid:gid (outputs owned by you),
# --ipc=host (PyTorch's data loaders and NCCL use /dev/shm, 64 MB by default in docker), all GPUs.
#   docker/run.sh run --config pipelines/sd-clip.toml
#   ENTRYPOINT=accelerate docker/run.sh launch --multi_gpu --num_processes 8 -m cfgen run --config pipelines/x.toml
# IMAGE (default cfgen:cuda), ENTRYPOINT (default cfgen) and DOCKER_ARGS (extra docker run flags,
# e.g. "--network host" for several nodes) are read from the environment.
set -euo pipefail
IMAGE=${IMAGE:-cfgen:cuda}
ENTRYPOINT=${ENTRYPOINT:-cfgen}
mkdir -p runs weights data
mounts=(-v "$PWD/runs:/app/runs" -v "$PWD/weights:/app/weights" -v "$PWD/data:/app/data")
# your pipelines/ (with your recipes) replaces the image's copy when there is one here
if [ -d pipelines ]; then mounts+=(-v "$PWD/pipelines:/app/pipelines"); fi
# shellcheck disable=SC2086
exec docker run --rm --gpus all --ipc=host --user "$(id -u):$(id -g)" -e HOME=/tmp \
  "${mounts[@]}" ${DOCKER_ARGS:-} --entrypoint "$ENTRYPOINT" "$IMAGE" "$@"
