"""Runs on the remote host (Python 3 standard library only): start, inspect, stop replicas.

The executor never installs anything remotely: it sends this file's source to `python -` over
ssh, followed by one line `main('<request as JSON>')`, and reads the JSON line printed back.
Each replica leaves `<id>.json` (pid, ports, labels) and `<id>.log` in the state directory, so a
restarted engine finds its replicas again by reading the metadata files.
"""

import json
import os
import signal
import socket
import subprocess
import time


def _proc_start(pid):
    """Start time of process `pid` (from /proc), or None when it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else fields[19]


def _free_ports(address, count):
    """Ports that are free on `address` right now (bound together, so they differ)."""
    socks = [socket.socket() for _ in range(count)]
    try:
        for s in socks:
            s.bind((address, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _read(path):
    """A replica's metadata with `alive` added; None if the file is gone."""
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return None
    meta["alive"] = _proc_start(meta["pid"]) == meta["proc_start"]
    return meta


def start(state_dir, replica_id, command, env, labels, bind_address):
    """Launch `command` plus free ports with nohup in a new session; record it; return it."""
    http, grpc, metrics = _free_ports(bind_address, 3)
    argv = ["nohup", *command, f"--http-port={http}", f"--grpc-port={grpc}"]
    argv.append(f"--metrics-port={metrics}")
    log = os.path.join(state_dir, replica_id + ".log")
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env},
            cwd=state_dir,
            start_new_session=True,  # own process group: survives ssh, killed as a group
        )
    meta = {
        "replica_id": replica_id,
        "pid": proc.pid,
        "proc_start": _proc_start(proc.pid),
        "http_port": http,
        "grpc_port": grpc,
        "metrics_port": metrics,
        "labels": labels,
        "started_at": time.time(),
        "log": log,
    }
    path = os.path.join(state_dir, replica_id + ".json")
    with open(path + ".tmp", "w") as f:
        json.dump(meta, f)
    os.replace(path + ".tmp", path)
    return _read(path)


def inspect(state_dir, replica_id=None):
    """Metadata of one replica, or of every replica in the state directory."""
    names = [replica_id + ".json"] if replica_id else sorted(os.listdir(state_dir))
    found = [_read(os.path.join(state_dir, n)) for n in names if n.endswith(".json")]
    return [meta for meta in found if meta is not None]


def stop(state_dir, replica_id, grace):
    """SIGTERM the replica's process group, SIGKILL after `grace` s, then forget it."""
    path = os.path.join(state_dir, replica_id + ".json")
    meta = _read(path)
    if meta is None:
        return False
    pid, started = meta["pid"], meta["proc_start"]
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        if _proc_start(pid) != started:
            break
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + wait
        while _proc_start(pid) == started and time.monotonic() < deadline:
            time.sleep(0.1)
    os.remove(path)
    return True


def main(request):
    """Run one operation (`op` of the JSON `request`) and print its result as a JSON line."""
    args = json.loads(request)
    op = args.pop("op")
    args["state_dir"] = os.path.expanduser(args["state_dir"])
    os.makedirs(args["state_dir"], exist_ok=True)
    if "replica_id" in args:  # never let an id point outside the state directory
        args["replica_id"] = os.path.basename(args["replica_id"])
    result = {"start": start, "inspect": inspect, "stop": stop}[op](**args)
    print(json.dumps({"result": result}))
