"""The shared runner: one Triton python-backend model per replica (`bioengine_runner`) that hosts
the pipelines of every shared-runner model, so each extra catalog model costs a thin stub instead
of a whole Python runtime. See `templates/bioengine_runner.py` for how it works."""

from __future__ import annotations

from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from .pbtxt import render_config
from .repository import BuiltModel, _fresh_dir, default_python_paths

RUNNER_NAME = "bioengine_runner"
"""The runner's Triton model name (not a model users can call: it is never listed)."""


def build_runner(
    dest: Path, *, python_paths: Sequence[str] | None = None, execution_env: str | None = None
) -> BuiltModel:
    """Write the runner model into repository `dest`."""
    import json

    model_dir = _fresh_dir(Path(dest) / RUNNER_NAME)
    version = model_dir / "1"
    version.mkdir()
    templates = resources.files("bioengine_core") / "templates"
    for src, name in (
        ("bioengine_runner.py", "model.py"),
        ("bioengine_wire.py", "bioengine_wire.py"),
    ):
        (version / name).write_text((templates / src).read_text(encoding="utf-8"), encoding="utf-8")
    paths = list(default_python_paths() if python_paths is None else python_paths)
    # the runner imports hosted models' model.py, which reads python_paths itself; the runner's
    # own imports (numpy) come from the same environment through this prelude
    prelude = (
        "import site as _site, sys as _sys\n"
        f"for _p in {json.dumps(paths)}:\n"
        "    _site.addsitedir(_p)\n"
        f"_sys.path[:0] = [p for p in {json.dumps(paths)} if p in _sys.path]\n"
    )
    model_py = version / "model.py"
    model_py.write_text(_insert_prelude(model_py.read_text(encoding="utf-8"), prelude))
    text = render_config(
        RUNNER_NAME,
        backend="python",
        max_batch_size=0,
        inputs=[("PING", "TYPE_INT32", [1])],
        outputs=[("PONG", "TYPE_INT32", [1])],
        dynamic_batching=False,
        parameters={"EXECUTION_ENV_PATH": execution_env} if execution_env else None,
    )
    (model_dir / "config.pbtxt").write_text(text, encoding="utf-8")
    return BuiltModel(name=RUNNER_NAME, backend="python", weight_format="-", path=model_dir)


def _insert_prelude(source: str, prelude: str) -> str:
    """`prelude` right after the module docstring (before the first import)."""
    marker = '"""\n\n'
    end = source.index(marker, 3) + len(marker)
    return source[:end] + prelude + source[end:]


__all__ = ["RUNNER_NAME", "build_runner"]
