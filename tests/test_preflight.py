"""Preflight: `config check` and `serve` ask each backend what it can check before anything
starts (through a third-party plugin's check), and serve's unexpected errors stay one line."""

from __future__ import annotations

from core_helpers import run_cli


def _site(tmp_path, **executor) -> str:
    lines = "\n".join(
        f"{k} = {v}" if isinstance(v, int) else f'{k} = "{v}"' for k, v in executor.items()
    )
    path = tmp_path / "site.toml"
    path.write_text(
        f'[engine]\nname = "pf"\nstate_dir = "{tmp_path / "state"}"\n\n'
        f'[executor]\nkind = "echo"\n{lines}\n'
    )
    return str(path)


def test_config_check_reports_what_the_backend_cannot_give(thirdparty_site, tmp_path):
    env = {"PYTHONPATH": str(thirdparty_site)}
    site = _site(tmp_path, slots=8)
    bad = run_cli("config", "check", "--config", site, env=env)
    assert bad.returncode == 2, bad.stdout
    assert f"{site}: [executor] slots = 8 but the echo cluster has 4" in bad.stderr
    assert "set [executor] slots <= 4" in bad.stderr
    offline = run_cli("config", "check", "--config", site, "--offline", env=env)
    assert offline.returncode == 0, offline.stderr
    assert "endpoints not contacted: --offline" in offline.stdout
    fits = run_cli("config", "check", "--config", _site(tmp_path, slots=4), env=env)
    assert fits.returncode == 0, fits.stderr


def test_a_failing_check_is_a_problem_line_not_a_traceback(thirdparty_site, tmp_path):
    env = {"PYTHONPATH": str(thirdparty_site)}
    result = run_cli("config", "check", "--config", _site(tmp_path, greeting="crash"), env=env)
    assert result.returncode == 2
    assert "[executor] the echo check itself failed: RuntimeError: the echo check broke" in (
        result.stderr
    )
    assert "Traceback" not in result.stderr + result.stdout


def test_serve_runs_the_checks_before_starting_anything(thirdparty_site, tmp_path):
    env = {"PYTHONPATH": str(thirdparty_site)}
    result = run_cli("serve", "--config", _site(tmp_path, slots=8), env=env, timeout=60)
    assert result.returncode == 2
    assert "slots = 8 but the echo cluster has 4" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "state").exists(), "nothing may start (or be written) before the checks"


def test_an_unexpected_error_in_serve_is_one_line_with_the_traceback_kept(
    thirdparty_site, tmp_path
):
    env = {"PYTHONPATH": str(thirdparty_site)}
    result = run_cli("serve", "--config", _site(tmp_path, greeting="boom"), env=env, timeout=60)
    assert result.returncode == 1, result.stdout + result.stderr
    crash = tmp_path / "state" / "serve-crash.log"
    assert "unexpected RuntimeError: echo plugin bug" in result.stderr
    assert str(crash) in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert "Traceback" in crash.read_text() and "echo plugin bug" in crash.read_text()


def test_verbose_flag_counts_and_keeps_wire_logs_for_vv():
    import logging

    from bioengine_core.cli import set_verbosity

    try:
        set_verbosity(1)
        assert logging.getLogger("bioengine").getEffectiveLevel() == logging.DEBUG
        assert logging.getLogger("botocore.endpoint").getEffectiveLevel() == logging.WARNING
        set_verbosity(2)
        assert logging.getLogger("botocore.endpoint").getEffectiveLevel() == logging.DEBUG
    finally:
        set_verbosity(0)


def test_config_check_finds_local_models_that_are_not_there(tmp_path):
    (tmp_path / "empty").mkdir()
    site = tmp_path / "site.toml"
    site.write_text(
        '[executor]\nkind = "local"\n'
        '[[models]]\nsource = "folder:./nope"\n[[models]]\nsource = "bundled:nope"\n'
        '[[models]]\nsource = "zip:nope.zip"\n[[models]]\nsource = "empty"\n'
        '[[models]]\nsource = "bundled:tiny_affine"\n'
    )
    result = run_cli("config", "check", "--config", str(site), "--offline")
    assert result.returncode == 2
    lines = [x.strip() for x in result.stderr.splitlines() if x.strip().startswith("- ")]
    assert len(lines) == 4, result.stderr
    assert (
        f"[models #1] key 'source' = 'folder:./nope': no folder at {tmp_path / 'nope'}"
        in (lines[0])
    )
    assert "[models #2]" in lines[1] and "no bundled model 'nope'" in lines[1]
    assert "tiny_affine" in lines[1]
    assert "[models #3]" in lines[2] and f"no file at {tmp_path / 'nope.zip'}" in lines[2]
    assert "[models #4]" in lines[3] and "not a bioimage.io model package" in lines[3]
