"""Images of any size: split an input the model does not accept as it is into tiles the model
accepts, with halo, and stitch the outputs — by bioimageio.core's own blocked prediction.

The engine builds bioimageio.core's `PredictionPipeline` for the package with a model adapter
that sends each block to the replicas (`weights_only`: the generated model skips its own
processing). So preprocessing that needs whole-image statistics uses the whole image, blocks,
halo, padding and stitching are bioimageio.core's, and the result equals bioimageio.core's
`predict_sample_with_blocking` on the same image; only the weights run on the replicas.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from .errors import InvalidInputError

log = logging.getLogger("bioengine.tiling")
os.environ.setdefault("TQDM_DISABLE", "1")  # bioimageio.core's per-block bars; we log per request

SPATIAL = {"x", "y", "z"}
MAX_TILED_ELEMENTS = 2**31
"""Largest input (elements) the engine tiles in one request."""


def _valid_size(spec: Any, i: int) -> int:
    """A size the model accepts on axis `i` (its fixed size, or its minimum)."""
    if spec.shape[i] > 0:
        return int(spec.shape[i])
    return int((spec.min_shape or [1] * len(spec.shape))[i]) or 1


def tileable(pkg: Any, specs: dict[str, tuple[tuple[int, ...], str]]) -> bool:
    """Whether a request whose shapes the model rejects fits once its spatial axes are tiled:
    every input has the right ids, dtype, number of axes and non-spatial sizes, batch 1."""
    from .modelpkg import check_tensor

    if set(specs) != {s.id for s in pkg.inputs}:
        return False
    if not str(pkg.descr.format_version).startswith("0.5"):
        return False  # bioimageio.core's blocked prediction needs a 0.5 description
    for spec in pkg.inputs:
        shape, dtype = specs[spec.id]
        if len(shape) != len(spec.axes):
            return False
        fitted = [
            _valid_size(spec, i) if axis in SPATIAL else int(size)
            for i, (axis, size) in enumerate(zip(spec.axes, shape, strict=True))
        ]
        if "batch" in spec.axes and shape[spec.axes.index("batch")] != 1:
            return False
        if int(np.prod(shape)) > MAX_TILED_ELEMENTS:
            return False
        try:
            check_tensor(pkg.id, spec, tuple(fitted), dtype)
        except InvalidInputError:
            return False
    return True


class Tiler:
    """bioimageio.core's blocked prediction for one package, with the weights on the replicas.

    `remote(inputs) -> outputs` runs one preprocessed block (numpy arrays by tensor id) through
    the replicas; it is called from the worker thread that runs `predict`.
    """

    def __init__(
        self,
        pkg: Any,
        remote: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
        parallel: Callable[[], int] = lambda: 2,
    ):
        from bioimageio.core import create_prediction_pipeline

        self.pkg = pkg
        self.remote = remote
        self.parallel = parallel  # blocks in flight at once (about two per ready replica)
        self.blocks_done = 0
        self.pipeline = create_prediction_pipeline(
            pkg.descr, model_adapter=_RemoteAdapter(pkg.descr, self._forward)
        )
        self._lock = threading.Lock()  # one pipeline, one image at a time

    def _forward(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = self.remote(arrays)
        self.blocks_done += 1
        return out

    def predict(
        self, inputs: dict[str, np.ndarray], progress: Callable[[int, int], None] | None = None
    ) -> dict[str, np.ndarray]:
        """The model's outputs for whole images of any size (blocking; run it in a thread).

        Blocks are as large as the image allows (up to bioimageio.core's default size
        parameter); an image smaller than the smallest block is padded (reflect, as
        bioimageio.core pads) and its outputs cropped back.
        """
        from bioimageio.core import Sample, Tensor

        ns = self._block_parameters(inputs)
        blocks = self.pkg.descr.get_tensor_sizes(ns, 1).inputs
        padded, pads = {}, {}
        for spec in self.pkg.inputs:
            arr = inputs[spec.id]
            widths = []
            for axis, size in zip(spec.axes, arr.shape, strict=True):
                need = int(blocks[spec.id].get(axis, size)) if axis in SPATIAL else size
                extra = max(0, need - size)
                widths.append((extra // 2, extra - extra // 2))
                if extra:
                    pads[axis] = (extra // 2, size, need)
            padded[spec.id] = np.pad(arr, widths, mode="reflect") if pads else arr
        members = {
            spec.id: Tensor.from_numpy(padded[spec.id], dims=tuple(spec.axes))
            for spec in self.pkg.inputs
        }
        with self._lock:
            sample = Sample(members=members, stat={}, id=None)
            result = self._blocked(sample, blocks, progress)
        out = {}
        for spec in self.pkg.outputs:
            data = result.members[spec.id].data.transpose(*spec.axes).values
            index = []
            for axis, size in zip(spec.axes, data.shape, strict=True):
                if axis in pads:
                    left, orig, padded_size = pads[axis]
                    f = size / padded_size
                    index.append(slice(round(left * f), round((left + orig) * f)))
                else:
                    index.append(slice(None))
            out[spec.id] = np.ascontiguousarray(data[tuple(index)].astype(spec.dtype, copy=False))
        return out

    def _blocked(
        self, sample: Any, block_shape: Any, progress: Callable[[int, int], None] | None = None
    ) -> Any:
        """bioimageio.core's fixed blocking (`_predict_sample_with_fixed_blocking_yield_
        intermediates_impl`), step for step, with several blocks on the replicas at once; at
        most `parallel()` blocks are held beyond the stitched output."""
        from concurrent.futures import ThreadPoolExecutor

        from bioimageio.core import Sample

        pp = self.pipeline
        pp._apply_samplewise_preprocessing(sample)
        total, blocks = sample.split_into_blocks(
            block_shape, halo=pp._default_input_halo, pad_mode=pp.pad_mode
        )

        def run(block: Any) -> Any:
            pp._apply_blockwise_preprocessing(block)
            return pp.predict_sample_block(block, skip_preprocessing=True, skip_postprocessing=True)

        predicted = None
        done = 0
        width = max(1, int(self.parallel()))
        with ThreadPoolExecutor(width, thread_name_prefix="bioengine-tile") as pool:
            pending: list[Any] = []
            blocks = iter(blocks)
            while True:
                while len(pending) < width and (block := next(blocks, None)) is not None:
                    pending.append(pool.submit(run, block))
                if not pending:
                    break
                out = pending.pop(0).result()  # in order: stitching as bioimageio.core does
                pp._apply_blockwise_postprocessing(out)
                if predicted is None:
                    predicted = Sample.from_blocks([out], fill_value=float("nan"))
                else:
                    predicted.set_block(out)
                done += 1
                if progress is not None:
                    progress(done, total)  # may raise to stop (a cancelled job)
        assert predicted is not None
        pp._apply_samplewise_postprocessing(predicted)
        return predicted

    def _block_parameters(self, inputs: dict[str, np.ndarray]) -> dict[Any, int]:
        """For each parameterized axis, the largest n <= 10 whose block (min + n * step) fits
        the image (0 when even the minimum does not: the image is padded then)."""
        from bioimageio.spec.model import v0_5

        ns: dict[Any, int] = {}
        for ipt, spec in zip(self.pkg.descr.inputs, self.pkg.inputs, strict=True):
            for i, axis in enumerate(ipt.axes):
                if isinstance(axis.size, v0_5.ParameterizedSize):
                    have = inputs[spec.id].shape[i]
                    step = max(1, axis.size.step)
                    ns[(ipt.id, axis.id)] = int(min(10, max(0, (have - axis.size.min) // step)))
        return ns


class _RemoteAdapter:
    """A bioimageio.core model adapter whose forward runs on the replicas."""

    def __new__(cls, descr: Any, forward: Callable[[dict[str, np.ndarray]], Any]) -> Any:
        from bioimageio.core import Tensor
        from bioimageio.core._model_adapter import ModelAdapter

        class RemoteAdapter(ModelAdapter):
            def load(self) -> None:
                self._loaded = True

            def unload(self) -> None:
                self._loaded = False

            def forward(self, inputs: Any) -> Any:
                arrays = {}
                for tid, axes in zip(self._input_ids, self._input_axes, strict=True):
                    tensor = inputs.get(tid)
                    if tensor is not None:
                        data = tensor.data.transpose(*[str(a) for a in axes]).values
                        arrays[str(tid)] = np.ascontiguousarray(data)
                got = forward(arrays)
                return {
                    tid: Tensor.from_numpy(got[str(tid)], dims=tuple(str(a) for a in axes))
                    for tid, axes in zip(self._output_ids, self._output_axes, strict=True)
                }

        return RemoteAdapter(descr, devices=None)


def remote_caller(
    loop: asyncio.AbstractEventLoop, infer: Callable[..., Any], model_id: str, outputs: list[str],
    timeout: float,
) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:  # fmt: skip
    """A blocking `remote` for Tiler: the router's async infer, run on the engine's loop."""

    def call(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        coro = infer(model_id, arrays, outputs, timeout=timeout, weights_only=True)
        return asyncio.run_coroutine_threadsafe(coro, loop).result()

    return call


def decode_inputs(request: Any) -> dict[str, np.ndarray]:
    """The numpy arrays of a parsed KServe request's input tensors (views of its body)."""
    from tritonclient.utils import triton_to_np_dtype

    return {
        t.name: np.frombuffer(t.data, dtype=triton_to_np_dtype(t.datatype)).reshape(t.shape)
        for t in request.inputs
    }


def encode_response(
    request: Any, model_id: str, outputs: dict[str, np.ndarray]
) -> tuple[bytes, dict[str, str]]:
    """A KServe v2 answer with the outputs the request asked for, binary or JSON as it asked."""
    import json

    from tritonclient.utils import np_to_triton_dtype

    from .kserve import HEADER_LEN

    wanted = request.outputs or [(name, request.binary_output) for name in outputs]
    entries, blobs = [], []
    for name, binary in wanted:
        arr = np.ascontiguousarray(outputs[name])
        entry: dict[str, Any] = {
            "name": name,
            "datatype": np_to_triton_dtype(arr.dtype),
            "shape": list(arr.shape),
        }
        if binary:
            blob = arr.tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = arr.ravel().tolist()
        entries.append(entry)
    header: dict[str, Any] = {"model_name": model_id, "model_version": "1", "outputs": entries}
    if request.client_id is not None:
        header["id"] = request.client_id
    head = json.dumps(header, separators=(",", ":")).encode()
    if not blobs:
        return head, {"Content-Type": "application/json"}
    return b"".join([head, *blobs]), {
        "Content-Type": "application/octet-stream",
        HEADER_LEN: str(len(head)),
    }


__all__ = ["Tiler", "decode_inputs", "encode_response", "remote_caller", "tileable"]
