"""Judge a model's outputs against its test outputs with the package's own tolerance.

A bioimage.io 0.5 package declares how closely its test outputs must be reproduced in
`config.bioimageio.reproducibility_tolerance`: a list of entries (relative_tolerance,
absolute_tolerance, mismatched_elements_per_million), each optionally limited to some
`output_ids` and `weights_formats`. As in bioimageio.core's `test_model`:

- the first entry whose output ids and weight formats include the output and the weight format
  the deployment runs applies (empty lists match everything); before that, a legacy
  `config.bioimageio.test_kwargs[weight_format]` sets rtol/atol; with neither, bioimageio.spec's
  `ReproducibilityTolerance()` defaults apply;
- a format 0.4 package gets bioimageio.core's defaults for it: rtol = atol = 1e-3 and no
  mismatched element allowed;
- an element is mismatched when `abs(actual - expected) > atol + rtol * abs(expected)`, and the
  output fails when more than `mismatched_elements_per_million` per million elements are.

Unlike bioimageio.core (which compares in float32), values are compared in float64, and a NaN or
infinity where the test output has a different value counts as mismatched (NaN compares false,
so a NaN output would otherwise pass).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

V04_RTOL = 1e-3
V04_ATOL = 1e-3
V04_MISMATCHED_PER_MILLION = 0.0
"""bioimageio.core's tolerance for format 0.4 packages (`_resource_tests._get_tolerance`)."""


@dataclass(frozen=True)
class Tolerance:
    """The tolerance that applies to one output: the comparison rule's three numbers."""

    relative_tolerance: float
    absolute_tolerance: float
    mismatched_elements_per_million: float
    source: str
    """Where it came from: "reproducibility_tolerance entry 1", "bioimageio.spec default", ..."""

    def as_dict(self) -> dict[str, Any]:
        """Plain data for reports."""
        return asdict(self)


def tolerance_for(descr: Any, output_id: str, weight_format: str | None) -> Tolerance:
    """The tolerance `descr` (a bioimageio.spec model description, or a `ModelPackage`)
    declares for `output_id` run with `weight_format`, as bioimageio.core picks it."""
    from bioimageio.spec.model import v0_5  # noqa: PLC0415  (slow import)

    descr = getattr(descr, "descr", descr)  # a ModelPackage keeps the description as .descr
    if not isinstance(descr, v0_5.ModelDescr):
        return Tolerance(
            V04_RTOL, V04_ATOL, V04_MISMATCHED_PER_MILLION, "bioimageio.core default for 0.4"
        )
    config = descr.config.bioimageio
    applicable = v0_5.ReproducibilityTolerance()
    source = "bioimageio.spec default"
    legacy = (config.model_extra or {}).get("test_kwargs") or {}
    if isinstance(legacy, dict) and isinstance(legacy.get(weight_format), dict):
        kwargs = legacy[weight_format]
        applicable = v0_5.ReproducibilityTolerance(
            relative_tolerance=kwargs.get("relative_tolerance", 1e-3),
            absolute_tolerance=kwargs.get("absolute_tolerance", 1e-3),
        )
        source = f"config.bioimageio.test_kwargs.{weight_format}"
    for number, entry in enumerate(config.reproducibility_tolerance, start=1):
        if (not entry.weights_formats or weight_format in entry.weights_formats) and (
            not entry.output_ids or output_id in [str(o) for o in entry.output_ids]
        ):
            applicable = entry
            source = f"reproducibility_tolerance entry {number}"
            break
    return Tolerance(
        float(applicable.relative_tolerance),
        float(applicable.absolute_tolerance),
        float(applicable.mismatched_elements_per_million),
        source,
    )


def compare(actual: Any, expected: np.ndarray, tolerance: Tolerance) -> dict[str, Any]:
    """One output against its test output: max_abs_error, max_rel_error, mismatched_elements,
    mismatched_per_million, elements, tolerance and passed (or error and passed=False)."""
    report: dict[str, Any] = {"tolerance": tolerance.as_dict()}
    if actual is None:
        return {**report, "error": "the model returned no such output", "passed": False}
    actual = np.asarray(actual)
    if actual.shape != expected.shape:
        return {
            **report,
            "error": f"shape {tuple(actual.shape)} != expected {tuple(expected.shape)}",
            "passed": False,
        }
    got = actual.astype(np.float64)
    want = expected.astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.abs(got - want)
        allowed = tolerance.absolute_tolerance + tolerance.relative_tolerance * np.abs(want)
        same = (got == want) | (np.isnan(got) & np.isnan(want))
        mismatched = ~(same | (diff <= allowed))
        diff = np.where(same, 0.0, np.where(np.isnan(diff), np.inf, diff))
        relative = diff / (np.abs(want) + 1e-6)  # as bioimageio.core reports it
        relative = np.where(np.isnan(relative), np.inf, relative)
    count = int(mismatched.sum())
    size = int(want.size)
    report.update(
        max_abs_error=float(diff.max()) if size else 0.0,
        max_rel_error=float(relative.max()) if size else 0.0,
        mismatched_elements=count,
        mismatched_per_million=count * 1e6 / size if size else 0.0,
        elements=size,
        # count/size*1e6 > allowed, without the rounding of a division
        passed=bool(count * 1_000_000 <= tolerance.mismatched_elements_per_million * size),
    )
    return report


def judge(
    descr: Any,
    outputs: dict[str, Any],
    expected: dict[str, np.ndarray],
    weight_format: str | None,
) -> dict[str, dict[str, Any]]:
    """Every test output in `expected` compared with `outputs[id]` under its tolerance."""
    return {
        tid: compare(outputs.get(tid), want, tolerance_for(descr, tid, weight_format))
        for tid, want in expected.items()
    }


def summary_line(output_id: str, report: dict[str, Any]) -> str:
    """One line naming the output, whether it passed and the figures (for logs and errors)."""
    tol = report["tolerance"]
    verdict = "passed" if report.get("passed") else "FAILED"
    if "error" in report:
        return f"output '{output_id}' {verdict}: {report['error']}"
    return (
        f"output '{output_id}' {verdict}: {report['mismatched_elements']} of "
        f"{report['elements']} elements mismatched ({report['mismatched_per_million']:.1f} per "
        f"million, {tol['mismatched_elements_per_million']:g} allowed), max abs error "
        f"{report['max_abs_error']:.3g}, max rel error {report['max_rel_error']:.3g} "
        f"(rtol {tol['relative_tolerance']:g}, atol {tol['absolute_tolerance']:g} from "
        f"{tol['source']})"
    )


__all__ = ["Tolerance", "compare", "judge", "summary_line", "tolerance_for"]
