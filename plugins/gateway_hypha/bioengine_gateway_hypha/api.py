"""The functions registered on Hypha: `bioengine-model-runner` and the `triton-client` service.

Every function receives Hypha's `context` (the service is registered with `require_context`),
which names the caller; deployment-changing operations check it against the operator's
authorisation settings. Every function is registered through `errors.guard`: a failure
reaches the caller as a one-line message, never as a server traceback.
"""

from __future__ import annotations

import dataclasses
import hmac
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from pydantic import SecretStr

from bioengine_core.contracts import ModelInfo, Service
from bioengine_core.errors import InvalidInputError, ModelNotFoundError

from .errors import RequestTooLargeError, guard, public_error

log = logging.getLogger("bioengine.gateway.hypha")

RUNNER_TYPE = "bioengine-model-runner"
TRITON_TYPE = "triton-client"
RUNNER_MODEL_NAME = "bioengine-model-runner"


def caller_of(context: dict[str, Any] | None) -> dict[str, Any]:
    """The calling user as Hypha describes it ({} when unknown)."""
    return dict((context or {}).get("user") or {})


def _plain(value: Any) -> Any:
    """JSON-compatible copy of `value` (RPC-safe: no Paths, enums or dataclasses)."""
    return json.loads(json.dumps(value, default=str))


def model_info_dict(info: ModelInfo) -> dict[str, Any]:
    """A served model as plain data."""
    return _plain(dataclasses.asdict(info))


def _numeric(name: str, value: Any) -> np.ndarray:
    """`value` as an array of bool, integers or floats; InvalidInputError otherwise."""
    try:
        array = np.asarray(value)
    except Exception as exc:  # ragged lists and the like
        raise InvalidInputError(f"input {name}: not an array ({type(exc).__name__})") from None
    if array.dtype.kind not in "biuf":
        raise InvalidInputError(
            f"input {name}: dtype {array.dtype} is not accepted (bool, integer or float arrays)"
        )
    return array


def normalise_inputs(inputs: Any) -> dict[str, np.ndarray] | list[np.ndarray]:
    """Accept a dict keyed by tensor id, a positional list, or one array (numeric only)."""
    if isinstance(inputs, dict):
        return {str(k): _numeric(repr(str(k)), v) for k, v in inputs.items()}
    if isinstance(inputs, (list, tuple)):
        return [_numeric(f"#{i}", v) for i, v in enumerate(inputs)]
    if isinstance(inputs, np.ndarray):
        return [_numeric("#0", inputs)]
    raise InvalidInputError(
        f"inputs must be a dict of arrays keyed by tensor id, a list of arrays or one array, "
        f"not {type(inputs).__name__}"
    )


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f} MiB"


class Authoriser:
    """Decides who may change the deployment: listed users, or holders of the admin secret."""

    def __init__(self, admin_users: list[str], admin_token: SecretStr | None) -> None:
        self.admin_users = {u.strip().lower() for u in admin_users if u.strip()}
        self._admin_token = admin_token

    def check(self, operation: str, context: dict[str, Any] | None, admin_token: str | None) -> str:
        """Return who is authorised, or raise PermissionError saying why not."""
        user = caller_of(context)
        uid = str(user.get("id") or "")
        anonymous = bool(user.get("is_anonymous", not uid))
        if admin_token and self._admin_token is not None:
            if hmac.compare_digest(
                admin_token.encode(), self._admin_token.get_secret_value().encode()
            ):
                return uid or "admin-token"
        if not anonymous:
            names = {uid.lower(), str(user.get("email") or "").lower()} - {""}
            if names & self.admin_users:
                return uid
        who = "anonymous callers" if anonymous else f"user '{uid}'"
        raise PermissionError(
            f"{operation} changes the deployment and needs authorisation; {who} may not. "
            "Log in to Hypha as a user listed in admin_users, or pass admin_token=."
        )


class HyphaApi:
    """Builds the two Hypha service definitions over one BioEngine `Service`."""

    def __init__(
        self,
        service: Service,
        authoriser: Authoriser,
        *,
        gateway_info: Callable[[], dict[str, Any]],
        direct_ticket: Callable[[dict[str, Any] | None], dict[str, Any] | None] | None = None,
        max_input_bytes: int | None = None,
    ) -> None:
        self.service = service
        self.auth = authoriser
        self.gateway_info = gateway_info
        self.direct_ticket = direct_ticket
        self.max_input_bytes = max_input_bytes
        self.inflight = 0

    # ------------------------------------------------------------------ input checks
    def input_ids(self, model_id: str) -> list[str]:
        """The model's input tensor ids in declared order; ModelNotFoundError if not served."""
        served = self.service.list_models()
        for info in served:
            if info.id == model_id:
                return [str(t.get("id") or t.get("name")) for t in info.inputs]
        raise ModelNotFoundError(model_id, [m.id for m in served])

    def check_specs(
        self,
        model_id: str,
        specs: dict[str, tuple[tuple[int, ...], str]] | list[tuple[tuple[int, ...], str]],
    ) -> None:
        """Check (shape, dtype) per input, keyed by id or positional, before data is used."""
        if isinstance(specs, list):
            ids = self.input_ids(model_id)
            if len(specs) != len(ids):
                raise InvalidInputError(
                    f"model '{model_id}' takes {len(ids)} input(s) "
                    f"({', '.join(repr(i) for i in ids)}), got {len(specs)}"
                )
            specs = dict(zip(ids, specs, strict=True))
        self.service.check_inputs(model_id, specs)

    def _bounded(self, inputs: dict[str, np.ndarray] | list[np.ndarray]) -> None:
        """RequestTooLargeError when the arrays together exceed `max_input_bytes`."""
        arrays = list(inputs.values()) if isinstance(inputs, dict) else list(inputs)
        total = sum(int(a.nbytes) for a in arrays)
        if self.max_input_bytes is not None and total > self.max_input_bytes:
            raise RequestTooLargeError(
                f"inputs of {_mib(total)} exceed this gateway's limit of "
                f"{_mib(self.max_input_bytes)} per request (rpc_max_input_bytes); "
                "send smaller tiles or use the direct path"
            )

    async def run(
        self,
        model_id: str,
        inputs: dict[str, np.ndarray] | list[np.ndarray],
        *,
        timeout: float | None = None,
    ) -> dict[str, np.ndarray]:
        """Run checked inputs through the service (shared by RPC and the direct path)."""
        self.inflight += 1
        try:
            return await self.service.infer(model_id, inputs, timeout=timeout)
        finally:
            self.inflight -= 1

    # ------------------------------------------------------------------ model runner
    def list_models(self, context: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """The models offered: id, name, description, tags, state (ready, available, loading,
        failed); loaded ones also inputs, outputs and weight format. In catalog mode this is the
        whole allowed collection."""
        return [_plain(row) for row in self.service.search_models("", 100_000)]

    def search_models(
        self,
        keywords: str | list[str] | None = None,
        limit: int = 10,
        context: dict[str, Any] | None = None,
    ) -> list[dict[str, Any]]:
        """Models matching any keyword (in id, name, description or tags), best first; in
        catalog mode the whole allowed collection, each with its state (ready, available...)."""
        if isinstance(keywords, str):
            words = keywords.replace(",", " ").split()
        else:
            words = [str(w) for w in (keywords or [])]
        words = [w.lower() for w in words if w.strip()]
        scored = []
        for index, row in enumerate(self.service.search_models("", 100_000)):
            mid = str(row.get("id", ""))
            fields = [mid, row.get("name"), row.get("description"), " ".join(row.get("tags", []))]
            text = " ".join(str(f).lower() for f in fields if f)
            score = sum(text.count(w) + (3 if w in mid.lower() else 0) for w in words)
            if score or not words:
                scored.append((-score, index, row))
        scored.sort(key=lambda item: (item[0], item[1]))
        return [_plain(row) for _, _, row in scored[: max(0, int(limit))]]

    async def get_model_rdf(
        self, model_id: str, context: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """The model's bioimage.io description (RDF) as a dict (loaded first in catalog mode)."""
        await self.service.ensure_model(str(model_id))
        return _plain(self.service.get_model(model_id))

    async def infer(
        self,
        model_id: str,
        inputs: Any,
        weight_format: str | None = None,
        timeout: float | None = None,
        context: dict[str, Any] | None = None,
    ) -> dict[str, np.ndarray]:
        """Run a model on numpy arrays (dict keyed by tensor id, or positional list) -> outputs."""
        arrays = normalise_inputs(inputs)
        self._bounded(arrays)
        await self.service.ensure_model(str(model_id))  # catalog mode: load it first
        if isinstance(arrays, dict):
            self.check_specs(model_id, {k: (a.shape, a.dtype.name) for k, a in arrays.items()})
        else:
            self.check_specs(model_id, [(a.shape, a.dtype.name) for a in arrays])
        return await self.run(model_id, arrays, timeout=timeout)

    async def test(self, model_id: str, context: dict[str, Any] | None = None) -> dict[str, Any]:
        """Run the model's own test inputs through the replicas; per output: passed, max
        abs/rel error and mismatched elements under the package's reproducibility tolerance."""
        self.inflight += 1
        try:
            return _plain(await self.service.test_model(model_id))
        finally:
            self.inflight -= 1

    def status(self, context: dict[str, Any] | None = None) -> dict[str, Any]:
        """The deployment's status (replicas, models, gateways) plus this gateway's state."""
        data = _plain(self.service.status())
        data["hypha"] = self.gateway_info()
        return data

    def get_direct_access(self, context: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """A ticket for the direct HTTP path (large arrays), or None when it is disabled."""
        return self.direct_ticket(context) if self.direct_ticket else None

    async def load_model(
        self,
        source: str,
        model_id: str | None = None,
        admin_token: str | None = None,
        context: dict[str, Any] | None = None,
    ) -> str:
        """Resolve, publish and load a model on every replica (needs authorisation)."""
        who = self.auth.check("load_model", context, admin_token)
        log.info("load_model %s (as %s) by %s", source, model_id, who)
        return await self.service.load_model(source, model_id=model_id)

    async def unload_model(
        self, model_id: str, admin_token: str | None = None, context: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Unload a model from every replica (needs authorisation)."""
        who = self.auth.check("unload_model", context, admin_token)
        log.info("unload_model %s by %s", model_id, who)
        await self.service.unload_model(model_id)
        return {"unloaded": model_id}

    async def scale(
        self, replicas: int, admin_token: str | None = None, context: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Set the target number of replicas (needs authorisation)."""
        who = self.auth.check("scale", context, admin_token)
        log.info("scale to %d replicas by %s", replicas, who)
        await self.service.scale(int(replicas))
        return {"replicas": int(replicas)}

    # ------------------------------------------------------------------ triton-client
    async def execute(
        self,
        inputs: Any = None,
        model_name: str = RUNNER_MODEL_NAME,
        context: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """Existing BioEngine clients' call: the model runner, or one model run directly."""
        if model_name == RUNNER_MODEL_NAME:
            return {"result": await self._run_packaged(inputs)}
        outputs = await self.infer(model_name, inputs)
        return dict(outputs)

    async def _run_packaged(self, inputs: Any) -> dict[str, Any]:
        """`[{"model_id", "inputs", "return_rdf", "weight_format"}]` -> the runner's result."""
        started = time.perf_counter()
        try:
            request = inputs[0] if isinstance(inputs, (list, tuple)) else inputs
            if not isinstance(request, dict) or "model_id" not in request:
                raise InvalidInputError(
                    'bioengine-model-runner expects inputs=[{"model_id": ..., "inputs": [...]}]'
                )
            model_id = str(request["model_id"])
            outputs = await self.infer(
                model_id, request.get("inputs"), weight_format=request.get("weight_format")
            )
            order = self._output_order(model_id, outputs)
            result: dict[str, Any] = {
                "outputs": [outputs[k] for k in order],
                "execution_time": time.perf_counter() - started,
                "success": True,
            }
            if request.get("return_rdf"):
                result["rdf"] = _plain(self.service.get_model(model_id))
            return result
        except Exception as exc:  # the runner reports failures in-band, as clients expect
            public = public_error(exc, where="bioengine-model-runner")
            log.info("bioengine-model-runner request failed: %s", public.message)
            return {"success": False, "error": public.message}

    def _output_order(self, model_id: str, outputs: dict[str, np.ndarray]) -> list[str]:
        """Output ids in the model's declared order (then any extra ones)."""
        declared: list[str] = []
        for info in self.service.list_models():
            if info.id == model_id:
                declared = [str(t.get("id") or t.get("name")) for t in info.outputs]
        return [k for k in declared if k in outputs] + [k for k in outputs if k not in declared]

    async def get_config(
        self, model_name: str = RUNNER_MODEL_NAME, context: dict[str, Any] | None = None, **kw: Any
    ) -> dict[str, Any]:
        """A Triton-style model configuration (name, inputs, outputs) for `model_name`."""
        if model_name != RUNNER_MODEL_NAME:
            await self.service.ensure_model(str(model_name))
        if model_name == RUNNER_MODEL_NAME:
            return {
                "name": RUNNER_MODEL_NAME,
                "backend": "bioengine",
                "input": [{"name": "inputs", "data_type": "TYPE_STRING", "dims": [-1]}],
                "output": [{"name": "result", "data_type": "TYPE_STRING", "dims": [-1]}],
                "models": [m.id for m in self.service.list_models()],
            }
        for info in self.service.list_models():
            if info.id == model_name:
                return {
                    "name": info.id,
                    "backend": info.weight_format,
                    "input": [_triton_tensor(t) for t in info.inputs],
                    "output": [_triton_tensor(t) for t in info.outputs],
                    "description": info.description,
                }
        self.service.get_model(model_name)  # raises ModelNotFoundError with the served ids
        raise KeyError(model_name)  # pragma: no cover - get_model raised already

    # ------------------------------------------------------------------ definitions
    def runner_definition(self, service_id: str, visibility: str) -> dict[str, Any]:
        """The `bioengine-model-runner` service as handed to `register_service`."""
        return {
            "id": service_id,
            "name": "BioEngine model runner",
            "type": RUNNER_TYPE,
            "description": "Run BioImage Model Zoo models served by this BioEngine deployment.",
            "config": {"visibility": visibility, "require_context": True},
            "list_models": guard(self.list_models),
            "search_models": guard(self.search_models),
            "get_model_rdf": guard(self.get_model_rdf),
            "infer": guard(self.infer),
            "test": guard(self.test),
            "status": guard(self.status),
            "get_direct_access": guard(self.get_direct_access),
            "load_model": guard(self.load_model),
            "unload_model": guard(self.unload_model),
            "scale": guard(self.scale),
        }

    def triton_definition(self, service_id: str, visibility: str) -> dict[str, Any]:
        """The `triton-client` compatible service as handed to `register_service`."""
        return {
            "id": service_id,
            "name": "BioEngine (triton-client compatible)",
            "type": TRITON_TYPE,
            "description": "execute()/get_config() as existing BioEngine clients call them.",
            "config": {"visibility": visibility, "require_context": True},
            "execute": guard(self.execute),
            "get_config": guard(self.get_config),
        }


_TRITON_TYPES = {
    "float32": "TYPE_FP32",
    "float64": "TYPE_FP64",
    "float16": "TYPE_FP16",
    "uint8": "TYPE_UINT8",
    "uint16": "TYPE_UINT16",
    "uint32": "TYPE_UINT32",
    "int8": "TYPE_INT8",
    "int16": "TYPE_INT16",
    "int32": "TYPE_INT32",
    "int64": "TYPE_INT64",
    "bool": "TYPE_BOOL",
}


def _triton_tensor(tensor: dict[str, Any]) -> dict[str, Any]:
    """A ModelInfo tensor as a Triton config tensor entry."""
    dims = [d if isinstance(d, int) else -1 for d in tensor.get("shape") or []]
    return {
        "name": str(tensor.get("id") or tensor.get("name")),
        "data_type": _TRITON_TYPES.get(str(tensor.get("dtype")), "TYPE_FP32"),
        "dims": dims,
        "axes": tensor.get("axes"),
    }
