"""Regenerate this tiny model package: y = 2 * x + 1 as an ONNX graph (for fast tests/benches).

Run: python models/tiny_affine/generate.py  (needs the `onnx` package; outputs are committed).
"""

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

HERE = Path(__file__).parent

x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 1, "h", "w"])
y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 1, "h", "w"])
two = helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])
one = helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])
graph = helper.make_graph(
    [helper.make_node("Mul", ["x", "two"], ["t"]), helper.make_node("Add", ["t", "one"], ["y"])],
    "tiny_affine", [x], [y], initializer=[two, one],
)
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
model.ir_version = 8
onnx.checker.check_model(model)
onnx.save(model, HERE / "weights.onnx")
rng = np.random.default_rng(0)
test_input = rng.random((1, 1, 4, 4), dtype=np.float32)
np.save(HERE / "test_input.npy", test_input)
np.save(HERE / "test_output.npy", (2 * test_input + 1).astype(np.float32))
