# shellcheck shell=bash
# The environment of every mimo launch, in one place. Sourced by the launch scripts. Each setting keeps a value
# that is already set, so a cluster can override any of them from its job environment without editing this file.

# --- PyTorch and megatron-core ------------------------------------------------------------------------------
# megatron-core relies on one CUDA work queue to order tensor-parallel communication before the compute that
# needs it (sequence parallelism, communication overlap).
export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"
# MoE token counts change every step; expandable segments keep the caching allocator from fragmenting on them.
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
# A failed or stuck collective raises on every rank instead of hanging until the job's time limit.
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
# torchrun forwards SIGTERM to the trainer, which finishes its step and saves a checkpoint; torchrun waits this
# many seconds before it kills the trainer. Keep it below the warning time Slurm gives (launch/slurm.sbatch).
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-900}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"

# --- NCCL ---------------------------------------------------------------------------------------------------
# Longest InfiniBand retry timeout and more retries: ride out short fabric stalls instead of failing the job.
export NCCL_IB_TIMEOUT="${NCCL_IB_TIMEOUT:-22}"
export NCCL_IB_RETRY_CNT="${NCCL_IB_RETRY_CNT:-10}"
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
# Network interfaces and HCAs are left to NCCL's detection. Set NCCL_SOCKET_IFNAME / NCCL_IB_HCA in the job
# environment where a cluster needs them; they are passed on like everything above.

# --- mimo-plan before every launch ----------------------------------------------------------------------------
MIMO_GPU="${MIMO_GPU:-h100}"     # h100 | h200 | b200: the planner's memory and peak-FLOPs figures
MIMO_MFU="${MIMO_MFU:-0.4}"      # the model-FLOPs utilisation the planner's time estimates assume

# Variables a launcher that starts remote processes itself (DeepSpeed's pdsh runner) must pass on. MIMO_DATA is
# among them because the full-scale recipes read it while composing the config: every rank must see the same.
# shellcheck disable=SC2034  # read by launch/deepspeed.sh
MIMO_EXPORTED_VARS="CUDA_DEVICE_MAX_CONNECTIONS PYTORCH_CUDA_ALLOC_CONF TORCH_NCCL_ASYNC_ERROR_HANDLING
TORCH_ELASTIC_SHUTDOWN_TIMEOUT OMP_NUM_THREADS NCCL_IB_TIMEOUT NCCL_IB_RETRY_CNT NCCL_DEBUG NCCL_SOCKET_IFNAME
NCCL_IB_HCA HF_HOME WANDB_API_KEY WANDB_MODE MIMO_DATA"
