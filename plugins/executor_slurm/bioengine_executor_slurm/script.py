"""Render the batch script of one replica from a Jinja2 template the operator can read and replace."""

from __future__ import annotations

import shlex
import sys
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from urllib.parse import quote, unquote

import jinja2

from bioengine_core.contracts import ReplicaSpec
from bioengine_core.errors import ConfigError
from bioengine_core.util import DEPLOYMENT_LABEL

from .settings import SlurmSettings

DEFAULT_TEMPLATE = "job.sh.j2"
COMMENT_PREFIX = "bioengine:"
_SAFE = "._-/:@"


def default_template_text() -> str:
    """The batch-script template shipped with the plugin."""
    return (resources.files(__package__) / "templates" / DEFAULT_TEMPLATE).read_text()


@dataclass
class ScriptPaths:
    """Where a job writes: shared by the engine host and the compute nodes."""

    state_dir: Path

    @property
    def endpoints(self) -> Path:
        """Endpoint files `<job id>.json` (written by the launcher once Triton is ready)."""
        return self.state_dir / "endpoints"

    @property
    def logs(self) -> Path:
        """Job output files `<job name>-<job id>.out`."""
        return self.state_dir / "logs"

    @property
    def stopped(self) -> Path:
        """Markers `<job id>` of jobs this executor cancelled (survive a restart of serve)."""
        return self.state_dir / "stopped"

    def ensure(self) -> None:
        """Create the directories."""
        for path in (self.endpoints, self.logs, self.stopped):
            path.mkdir(parents=True, exist_ok=True)

    def prune(self, max_age_days: float = 30.0) -> int:
        """Delete bookkeeping files (stop markers, exit records, script copies) older than this.

        Job output files in `logs/` are left to the operator.
        """
        cutoff = time.time() - max_age_days * 86400
        removed = 0
        for pattern in ("stopped/*", "endpoints/*.exit.json", "scripts/*.sh"):
            for path in self.state_dir.glob(pattern):
                try:
                    if path.stat().st_mtime < cutoff:
                        path.unlink()
                        removed += 1
                except OSError:
                    continue
        return removed


SHORT_NAME_LENGTH = 5
"""Characters of the deployment in a job name: SHORT.N fits squeue's 8-character name column
for slots up to 99."""


def short_name(settings: SlurmSettings, deployment: str) -> str:
    """The deployment's short form in job names: `[executor] job_name`, or its first characters."""
    return settings.job_name or deployment[:SHORT_NAME_LENGTH]


def job_name(settings: SlurmSettings, deployment: str, slot: int = 1) -> str:
    """The name of replica `slot` of `deployment`: `SHORT.N` (`bioen.1`, `imagi.2`), which plain
    `squeue` shows whole; the legacy `PREFIX-DEPLOYMENT` when `job_name_prefix` is set."""
    if settings.job_name_prefix:
        return f"{settings.job_name_prefix}-{deployment}"
    return f"{short_name(settings, deployment)}.{slot}"


def slot_of(name: str) -> int | None:
    """The replica slot in a job name `SHORT.N`; None for another name."""
    head, sep, tail = name.rpartition(".")
    return int(tail) if sep and head and tail.isdigit() else None


def names_deployment(settings: SlurmSettings, deployment: str, name: str) -> bool:
    """Whether `name` is a job name of `deployment`'s replicas (any slot)."""
    if settings.job_name_prefix:
        return name == f"{settings.job_name_prefix}-{deployment}"
    head, sep, tail = name.rpartition(".")
    return bool(sep) and tail.isdigit() and head == short_name(settings, deployment)


def comment_deployment(comment: str) -> str | None:
    """The deployment a job comment written by `job_comment` names; None if it is not ours."""
    labels = parse_comment(comment)
    return labels.get(DEPLOYMENT_LABEL) if labels else None


def job_comment(deployment: str, labels: dict[str, str] | None = None) -> str:
    """The job comment: `bioengine:` and the replica's labels as `k=v,...` (percent-encoded)."""
    merged = {DEPLOYMENT_LABEL: deployment, **(labels or {})}
    merged[DEPLOYMENT_LABEL] = deployment
    pairs = [f"{quote(k, safe=_SAFE)}={quote(v, safe=_SAFE)}" for k, v in merged.items()]
    return COMMENT_PREFIX + ",".join(pairs)


def parse_comment(comment: str) -> dict[str, str] | None:
    """The labels in a job comment written by `job_comment`; None if it is not ours."""
    if not comment.startswith(COMMENT_PREFIX):
        return None
    labels = {}
    for pair in comment[len(COMMENT_PREFIX) :].split(","):
        key, sep, value = pair.partition("=")
        if sep:
            labels[unquote(key)] = unquote(value)
    return labels


def gpu_option(settings: SlurmSettings, gpus: int) -> str:
    """The #SBATCH option requesting `gpus` GPUs, or '' for none."""
    if gpus <= 0:
        return ""
    typed = f"{settings.gpu_type}:{gpus}" if settings.gpu_type else str(gpus)
    if settings.gpu_request == "gpus":
        return f"--gpus={typed}"
    return f"--gres=gpu:{typed}"


def replica_env(settings: SlurmSettings, spec: ReplicaSpec) -> dict[str, str]:
    """The replica's own variables (settings, the repository's credentials, the spec's): they
    travel in sbatch's environment, never in the script."""
    return {**settings.env, **spec.repository.env, **spec.env}


def passed_names(settings: SlurmSettings, spec: ReplicaSpec) -> list[str]:
    """Names and patterns the launcher passes from the job's environment to tritonserver."""
    names = sorted(replica_env(settings, spec))
    return names + [p for p in settings.pass_env if p not in names]


def launch_command(
    settings: SlurmSettings, spec: ReplicaSpec, paths: ScriptPaths, gpus: int
) -> list[str]:
    """The launcher's command line, as shell-quoted lines of one flag (and value) each."""
    q = shlex.quote
    python = settings.python or sys.executable
    lines = [f"{q(python)} -m bioengine_executor_slurm.launch"]

    def opt(flag: str, value: object) -> None:
        text = str(value)
        # `--flag=--value` keeps argparse from reading a value that starts with '-' as a flag.
        lines.append(q(f"{flag}={text}") if text.startswith("-") else f"{flag} {q(text)}")

    opt("--endpoint-dir", paths.endpoints)
    opt("--repository", spec.repository.uri)
    for model in spec.models:
        opt("--model", model)
    opt("--bind-address", settings.bind_address)
    if settings.port_range:
        opt("--port-range", settings.port_range)
    if settings.advertise_host:
        opt("--advertise-host", settings.advertise_host)
    opt("--ready-timeout", f"{settings.ready_timeout:g}")
    if not any(a.startswith("--exit-timeout-secs") for a in settings.triton_args):
        opt("--exit-timeout", settings.exit_timeout)
    if settings.container == "none":
        if settings.triton_binary:
            opt("--triton-binary", settings.triton_binary)
    else:
        opt("--container", settings.container)
        opt("--image", settings.image)
        opt("--container-triton", settings.container_triton)
        for option in settings.container_options:
            opt("--container-option", option)
        if spec.repository.local_path is not None:
            opt("--bind", spec.repository.local_path)
    for name in passed_names(settings, spec):
        opt("--pass-env", name)
    if gpus:
        opt("--gpus", gpus)
    for arg in settings.triton_args:
        opt("--triton-arg", arg)
    return lines


def _environment(template_path: Path | None) -> tuple[jinja2.Environment, str, str]:
    env = jinja2.Environment(
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined,
        autoescape=False,
    )
    env.filters["q"] = lambda value: shlex.quote(str(value))
    if template_path is None:
        return env, default_template_text(), f"{__package__}/templates/{DEFAULT_TEMPLATE}"
    try:
        text = template_path.read_text()
    except OSError as exc:
        raise ConfigError(
            f"[executor] template = {str(template_path)!r}: cannot read: {exc}"
        ) from None
    return env, text, str(template_path)


def render_script(
    settings: SlurmSettings,
    spec: ReplicaSpec,
    paths: ScriptPaths,
    *,
    template_path: Path | None = None,
    slot: int = 1,
) -> str:
    """The complete batch script that `start(spec)` submits as replica `slot`."""
    env, text, label = _environment(template_path)
    gpus = spec.gpus or settings.gpus
    extra = [line.removeprefix("#SBATCH").strip() for line in settings.extra_sbatch]
    try:
        template = env.from_string(text)
        return template.render(
            s=settings,
            spec=spec,
            deployment=spec.deployment,
            job_name=job_name(settings, spec.deployment, slot),
            slot=slot,
            comment=job_comment(spec.deployment, spec.labels),
            output=paths.logs / "%x-%j.out",
            gpus=gpus,
            gpu_option=gpu_option(settings, gpus),
            extra_sbatch=extra,
            env_names=sorted(replica_env(settings, spec)),
            launch=launch_command(settings, spec, paths, gpus),
            endpoint_dir=paths.endpoints,
            template_name=label,
        )
    except jinja2.TemplateError as exc:
        raise ConfigError(f"batch-script template {label}: {exc}") from None
