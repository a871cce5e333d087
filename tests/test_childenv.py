"""Child processes get an allow-listed environment: the engine's secrets stay in the engine."""

from __future__ import annotations

from bioengine_core.childenv import child_env
from bioengine_core.commands import run_command


def test_child_env_keeps_only_the_allow_list_and_extras():
    base = {
        "PATH": "/usr/bin",
        "LC_ALL": "C.UTF-8",
        "BIOENGINE_ADMIN_TOKEN": "t0ken",
        "AWS_SECRET_ACCESS_KEY": "k3y",
        "CONTAINERS_CONF": "/etc/c.conf",
    }
    env = child_env({"EXTRA": "1"}, base=base)
    assert env == {"PATH": "/usr/bin", "LC_ALL": "C.UTF-8", "EXTRA": "1"}
    assert child_env(base=base, allow=("CONTAINERS_*",))["CONTAINERS_CONF"] == "/etc/c.conf"
    # an explicit extra wins over the inherited value
    assert child_env({"PATH": "/opt/bin"}, base=base)["PATH"] == "/opt/bin"


def test_run_command_does_not_pass_secrets_unless_asked(monkeypatch):
    monkeypatch.setenv("BIOENGINE_ADMIN_TOKEN", "never-in-children-123")
    monkeypatch.setenv("SSH_AUTH_SOCK", "/tmp/agent.sock")
    out = run_command(["sh", "-c", "env"])
    assert "never-in-children-123" not in out and "SSH_AUTH_SOCK" not in out
    assert "PATH=" in out
    out = run_command(["sh", "-c", "env"], allow_env=("SSH_AUTH_SOCK",))
    assert "SSH_AUTH_SOCK=/tmp/agent.sock" in out and "never-in-children" not in out
    out = run_command(["sh", "-c", "env"], env={"ONLY": "this"})
    assert "ONLY=this" in out and "never-in-children" not in out and "SSH_AUTH_SOCK" not in out
