"""Triton python-backend model `bioengine_runner`: one process per replica that hosts the
prediction pipelines of every shared-runner model (catalog mode).

Each python-backend model is otherwise its own stub process with its own Python, numpy,
bioimageio.core and runtime (~175-330 MB each). A shared-runner model's stub stays thin: it checks
inputs, then sends the arrays over a Unix socket to this runner, which imports the model's own
generated `model.py` (so pre- and post-processing are exactly the same code) and runs it. Copied
verbatim into `<repository>/bioengine_runner/1/model.py`, next to `bioengine_wire.py`.
"""

import importlib.util
import itertools
import os
import socketserver
import sys
import threading

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402
from bioengine_wire import WireError, recv_msg, runner_socket, send_msg  # noqa: E402

_COUNTER = itertools.count()
_IMPORT_LOCK = threading.Lock()


def _host(model_dir, args):
    """Import a model directory's generated model.py as its own module and initialise it here
    (in-process pipeline); return the model instance."""
    path = os.path.join(model_dir, "model.py")
    if not os.path.isfile(path):
        raise WireError(f"no generated model.py in {model_dir}")
    # one load at a time: module execution touches sys.path, and bioimageio.spec's description
    # loading is not thread-safe (concurrent loads corrupt its YAML parser state)
    with _IMPORT_LOCK:
        spec = importlib.util.spec_from_file_location(f"bioengine_hosted_{next(_COUNTER)}", path)
        module = importlib.util.module_from_spec(spec)
        module.HOSTED = True  # the module runs its pipeline here instead of asking a runner
        spec.loader.exec_module(module)
        model = module.TritonPythonModel()
        model.initialize(dict(args))
    return model


class _Connection(socketserver.BaseRequestHandler):
    """One thin stub instance: `load`, then `predict` calls until it disconnects."""

    def handle(self):
        conn = self.request
        model = None
        try:
            while True:
                try:
                    header, arrays = recv_msg(conn)
                except EOFError:
                    return
                op = header.get("op")
                try:
                    if op == "load" and model is None:
                        model = _host(str(header["dir"]), header.get("args") or {})
                        send_msg(conn, {"ok": True, "pid": os.getpid()})
                    elif op == "predict" and model is not None:
                        weights_only = header.get("weights_only") is True
                        send_msg(conn, {"ok": True}, model._predict(arrays, weights_only))
                    else:
                        send_msg(conn, {"error": f"unexpected request {op!r}"})
                except Exception as exc:  # reported to the stub, which answers the client
                    send_msg(conn, {"error": f"{type(exc).__name__}: {exc}"})
        finally:
            if model is not None:
                model.finalize()


class _Server(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True


class TritonPythonModel:
    """Serves the runner socket; `execute` answers how many pipelines it hosts (a probe)."""

    def initialize(self, args):
        path = runner_socket(os.getppid())
        if os.path.exists(path):
            os.unlink(path)  # left by a runner of an earlier Triton with the same pid
        self.server = _Server(path, _Connection)
        os.chmod(path, 0o600)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.path = path
        pb_utils.Logger.log_info(f"bioengine: shared runner listening on {path}")

    def execute(self, requests):
        hosted = sum(1 for t in threading.enumerate() if t is not self.thread) - 1
        out = np.array([max(0, hosted)], dtype=np.int32)
        return [
            pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("PONG", out)])
            for _ in requests
        ]

    def finalize(self):
        self.server.shutdown()
        self.server.server_close()
        try:
            os.unlink(self.path)
        except OSError:
            pass
