"""Which variables travel from `serve` to a replica job, and from the job to tritonserver.

Allow-lists for `bioengine_core.childenv.child_env`: the engine's secrets (API tokens, a Hypha
admin secret, S3 keys of other components) reach neither sbatch, the job, nor Triton.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping

from bioengine_core.childenv import APPTAINER_CLIENT_ALLOW, CONTAINER_CLIENT_ALLOW

TRITON_ALLOW: tuple[str, ...] = ("CUDA_*",)
"""Job variables tritonserver inherits besides `childenv.BASE_ALLOW` (CUDA tuning)."""

RUNTIME_ALLOW: tuple[str, ...] = (*CONTAINER_CLIENT_ALLOW, *APPTAINER_CLIENT_ALLOW)
"""What a container runtime client in the job reads (the core's docker/podman and
apptainer/singularity client lists: sockets, config, image cache, proxies for pulls); the
container itself gets only the variables passed to it explicitly."""

JOB_ALLOW: tuple[str, ...] = (
    *TRITON_ALLOW,
    *RUNTIME_ALLOW,
    # environment modules / Lmod, for `module load` in `setup` lines
    "BASH_ENV",
    "MODULEPATH",
    "MODULESHOME",
    "MODULES_*",
    "LMOD_*",
    "LOADEDMODULES",
    "_LMFILES_",
    "BASH_FUNC_module*",
    "BASH_FUNC_ml*",
    "BASH_FUNC__module_raw*",
    # the Python that runs the launcher
    "PYTHONPATH",
    "PYTHONHOME",
    "VIRTUAL_ENV",
    "CONDA_PREFIX",
)
"""Variables of `serve`'s environment a replica job inherits besides `childenv.BASE_ALLOW`."""

SBATCH_ALLOW: tuple[str, ...] = ("SLURM_CONF", "SBATCH_*")
"""sbatch's own settings: the cluster's config file and the operator's SBATCH_* defaults."""

SLURM_CLIENT_ALLOW: tuple[str, ...] = ("SLURM_CONF",)
"""What squeue, sacct, scontrol and scancel get besides the base set: the cluster to talk to."""


def matching(environ: Mapping[str, str], patterns: Iterable[str]) -> dict[str, str]:
    """The variables of `environ` whose names match one of `patterns` (names or `X_*`)."""
    patterns = tuple(patterns)
    return {k: v for k, v in environ.items() if any(fnmatch.fnmatchcase(k, p) for p in patterns)}
