#!/bin/bash
# BioEngine: one Triton replica of deployment "lab" as a Slurm batch job.
# Rendered from bioengine_executor_slurm/templates/job.sh.j2;
# `bioengine slurm script --config FILE` prints it.
#SBATCH --job-name=lab.1
#SBATCH --comment=bioengine:bioengine.deployment=lab
#SBATCH --output=/shared/bioengine/state/logs/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=2
#SBATCH --time=12:00:00
#SBATCH --no-requeue
#SBATCH --partition=gpu
#SBATCH --mem=64G
#SBATCH --gres=gpu:a100:2

# Site setup ([executor] setup)
module load apptainer

# Start Triton, wait until it is ready, then publish host:port in the endpoint directory.
# The launcher forwards SIGTERM (scancel, time limit) to tritonserver.
exec /opt/bioengine/venv/bin/python -m bioengine_executor_slurm.launch \
    --endpoint-dir /shared/bioengine/state/endpoints \
    --repository /shared/bioengine/repository \
    --model unet2d_nuclei_broad \
    --model stardist \
    --bind-address 0.0.0.0 \
    --ready-timeout 600 \
    --exit-timeout 3 \
    --container apptainer \
    --image /shared/images/tritonserver_24.08-py3.sif \
    --container-triton tritonserver \
    --bind /shared/bioengine/repository \
    --gpus 2
