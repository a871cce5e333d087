"""Before anything is submitted: does the cluster have the partition, and can its nodes give
what `[executor]` asks for? (`bioengine config check` and `serve` run this.)"""

from __future__ import annotations

import re
from typing import Any

from bioengine_core.errors import BioEngineError

from .settings import SlurmSettings
from .slurm import SlurmCLI, parse_duration

_MEMORY = re.compile(r"^(\d+(?:\.\d+)?)([KMGT]?)B?$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 / 1024, "M": 1, "G": 1024, "T": 1024 * 1024}


def megabytes(text: str) -> float | None:
    """Slurm memory (`16G`, `4000`, `512M`) in MB; None when unlimited or unreadable."""
    match = _MEMORY.match(text.strip())
    return float(match.group(1)) * _UNITS[match.group(2).upper()] if match else None


def records(text: str) -> list[dict[str, str]]:
    """`scontrol show ... -o` output: one `Key=Value ...` record per line."""
    found = []
    for line in text.splitlines():
        fields = dict(item.split("=", 1) for item in re.findall(r"(\w+=\S*)", line) if "=" in item)
        if fields:
            found.append(fields)
    return found


def _scontrol(*args: str) -> str:
    return SlurmCLI(retries=0, timeout=5.0).run(["scontrol", *args, "-o"])


def _gpus(gres: str) -> int:
    """GPUs a node's `Gres=` offers (`gpu:a100:4,...`, `gpu:2(S:0)`), 0 for `(null)`."""
    total = 0
    for item in gres.split(","):
        parts = item.split("(")[0].split(":")
        if parts[0] == "gpu" and parts[-1].isdigit():
            total += int(parts[-1])
    return total


def preflight(*, settings: SlurmSettings, context: Any, offline: bool) -> list[str]:
    """Problems with the partition and the requested resources, each naming the key."""
    if offline:
        return []
    try:
        partitions = records(_scontrol("show", "partition"))
        if settings.partition:
            chosen = [p for p in partitions if p.get("PartitionName") == settings.partition]
        else:
            chosen = [p for p in partitions if p.get("Default") == "YES"]
        if not chosen:
            names = ", ".join(p.get("PartitionName", "?") for p in partitions) or "none"
            if settings.partition:
                return [
                    f"partition = {settings.partition!r} does not exist on this cluster "
                    f"(partitions: {names}): fix [executor] partition"
                ]
            return [f"the cluster has no default partition: set [executor] partition ({names})"]
        part = chosen[0]
        name = part.get("PartitionName", "?")
        nodes = records(_scontrol("show", "node", part.get("Nodes", "")))
    except BioEngineError as exc:
        first = str(exc).strip().splitlines()
        why = first[-1] if first else "no answer"
        return [
            f"the Slurm controller does not answer `scontrol show partition` ({why}): is "
            "slurmctld running and SLURM_CONF right on this host? (config check --offline skips this)"
        ]
    return _limits(settings, name, part, nodes)


def _limits(
    settings: SlurmSettings, name: str, part: dict[str, str], nodes: list[dict[str, str]]
) -> list[str]:
    problems = []
    cpus = max((int(n.get("CPUTot", "0") or 0) for n in nodes), default=0)
    cap = part.get("MaxCPUsPerNode", "UNLIMITED")
    if cap.isdigit():
        cpus = min(cpus, int(cap)) if cpus else int(cap)
    if cpus and settings.cpus > cpus:
        problems.append(
            f"cpus = {settings.cpus} but the largest node in partition {name!r} has {cpus} "
            f"CPU(s): set [executor] cpus <= {cpus}"
        )
    if settings.memory:
        want = megabytes(settings.memory)
        have = max((float(n.get("RealMemory", "0") or 0) for n in nodes), default=0)
        cap_mem = megabytes(part.get("MaxMemPerNode", "UNLIMITED"))
        if cap_mem:
            have = min(have, cap_mem) if have else cap_mem
        if want and have and want > have:
            problems.append(
                f"memory = {settings.memory!r} but the largest node in partition {name!r} has "
                f"{int(have)} MB: set [executor] memory to at most {int(have)}M"
            )
    if settings.gpus:
        gpus = max((_gpus(n.get("Gres", "")) for n in nodes), default=0)
        if settings.gpus > gpus:
            problems.append(
                f"gpus = {settings.gpus} but the nodes of partition {name!r} have "
                f"{gpus or 'no'} GPU(s) (Gres): set [executor] gpus <= {gpus} or choose a "
                "GPU partition"
            )
    problems += _allowed(settings.account, "account", "Accounts", name, part)
    problems += _allowed(settings.qos, "qos", "Qos", name, part)
    max_time = part.get("MaxTime", "UNLIMITED")
    wanted, allowed = parse_duration(settings.time_limit), parse_duration(max_time)
    if max_time != "UNLIMITED" and wanted and allowed and wanted > allowed:
        problems.append(
            f"time_limit = {settings.time_limit!r} exceeds the MaxTime {max_time} of partition "
            f"{name!r}: set [executor] time_limit <= {max_time}"
        )
    return problems


def _allowed(value: str | None, key: str, field: str, name: str, part: dict[str, str]) -> list[str]:
    """`account`/`qos` against the partition's AllowAccounts/DenyAccounts (AllowQos/DenyQos)."""
    if not value:
        return []
    allow = part.get(f"Allow{field}", "ALL")
    deny = part.get(f"Deny{field}", "")
    allowed = [a for a in allow.split(",") if a]
    if allow != "ALL" and value not in allowed:
        return [
            f"{key} = {value!r} may not use partition {name!r} (Allow{field}={allow}): set "
            f"[executor] {key} to one of {', '.join(allowed)} or choose another partition"
        ]
    if value in deny.split(","):
        return [
            f"{key} = {value!r} may not use partition {name!r} (Deny{field}={deny}): change "
            f"[executor] {key} or partition"
        ]
    return []


__all__ = ["megabytes", "preflight", "records"]
