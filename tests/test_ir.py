"""IR core: types with symbolic dims, printer/parser round trip, verifier, interpreter, networkx view."""

import numpy as np
import pytest

from slimgraph.compiler import ops
from slimgraph.compiler.errors import GraphStructureError, IRParseError, RuntimeInputError, ShapeMismatchError
from slimgraph.compiler.graphview import to_networkx
from slimgraph.compiler.interpreter import run
from slimgraph.compiler.ir import FunctionBuilder, FunctionKind, Module, Node, Weight
from slimgraph.compiler.printer import parse_module, print_module
from slimgraph.compiler.types import DType, TensorType, dim_mul, dims_equal
from slimgraph.compiler.verifier import verify


def small_module():
    rng = np.random.default_rng(0)
    weights = {"fc.weight": Weight(rng.standard_normal((8, 16)).astype(np.float32)),
               "fc.bias": Weight(rng.standard_normal(16).astype(np.float32))}
    fused = FunctionBuilder("fused_gelu", weights, kind=FunctionKind.FUSED)
    p = fused.param("p", TensorType(DType.f32, (1, "T", 16)))
    fused.output(fused.add(ops.GELU, [p], {"approximate": "tanh"}))
    fused_fn = fused.build()
    b = FunctionBuilder("main", weights, functions={"fused_gelu": fused_fn})
    x = b.param("x", TensorType(DType.f32, (1, "T", 8)))
    h = b.add(ops.MATMUL, [x, "@fc.weight"])
    h = b.add(ops.ADD, [h, "@fc.bias"])
    h = b.add(ops.CALL, [h], {"callee": "fused_gelu"})
    h = b.add(ops.RESHAPE, [h], {"shape": (1, "T", 4, 4)})
    h = b.add(ops.SLICE, [h], {"axis": 1, "start": 1, "end": "T"})
    b.output(b.add(ops.MEAN, [h], {"axes": (-1,), "keepdims": True}))
    return Module({"main": b.build(), "fused_gelu": fused_fn}, weights, {"source": "test"})


def test_symbolic_dims_simplify():
    assert dim_mul("T", 9) == "9*T"
    assert dims_equal(dim_mul("T", 2, 3), dim_mul(6, "T"))
    assert TensorType.parse("f32[1,T-1,4]").shape == (1, "T-1", 4)


def test_printer_round_trip_and_determinism():
    text = print_module(small_module())
    assert text == print_module(small_module())
    assert print_module(parse_module(text)) == text
    assert "%slice = slice(%reshape) {axis=1, start=1, end=T} : f32[1,T-1,4,4]" in text
    assert "weight @fc.weight : f32[8,16] #" in text
    assert "0." not in text.split("weight @fc.weight")[1].splitlines()[0]  # no values printed


def test_parse_with_weights_checks_digest():
    module = small_module()
    data = {k: w.array for k, w in module.weights.items()}
    parsed = parse_module(print_module(module), weights=data)
    x = np.ones((1, 5, 8), np.float32)
    np.testing.assert_allclose(run(parsed, {"x": x})[0], run(module, {"x": x})[0])
    data["fc.bias"] = data["fc.bias"] + 1
    with pytest.raises(IRParseError, match="fc.bias"):
        parse_module(print_module(module), weights=data)


def test_parse_error_names_line():
    text = print_module(small_module()).replace("= matmul(", "= matmool(")
    with pytest.raises(IRParseError, match=r"<ir>:\d+: unknown op 'matmool'"):
        parse_module(text)


def test_interpreter_binds_symbols_and_checks_inputs():
    module = small_module()
    out = run(module, {"x": np.ones((1, 5, 8), np.float32)})[0]
    assert out.shape == (1, 4, 4, 1)
    with pytest.raises(RuntimeInputError, match="expected dtype f32"):
        run(module, {"x": np.ones((1, 5, 8), np.float64)})
    with pytest.raises(RuntimeInputError, match="rank 3"):
        run(module, {"x": np.ones((5, 8), np.float32)})


def test_verifier_accepts_valid_module():
    verify(small_module())


def _replace_main_nodes(module, nodes):
    main = module.main
    from dataclasses import replace

    return module.with_function(replace(main, nodes=tuple(nodes)))


def test_verifier_undefined_value_and_cycle():
    module = small_module()
    nodes = list(module.main.nodes)
    bad = Node("add", nodes[1].op, ("nope", "@fc.bias"), nodes[1].attrs, nodes[1].type)
    with pytest.raises(GraphStructureError, match="%add.*undefined value %nope"):
        verify(_replace_main_nodes(module, [nodes[0], bad] + nodes[2:]))
    swapped = [nodes[1], nodes[0]] + nodes[2:]
    with pytest.raises(GraphStructureError, match="before its definition"):
        verify(_replace_main_nodes(module, swapped))
    with pytest.raises(GraphStructureError, match="defined twice"):
        verify(_replace_main_nodes(module, [nodes[0], nodes[0]] + nodes[1:]))


def test_verifier_type_mismatch_names_node():
    module = small_module()
    nodes = list(module.main.nodes)
    wrong = Node(nodes[0].name, nodes[0].op, nodes[0].inputs, nodes[0].attrs, TensorType(DType.f32, (1, "T", 99)))
    with pytest.raises(ShapeMismatchError, match="%matmul.*stored type f32\\[1,T,99\\]"):
        verify(_replace_main_nodes(module, [wrong] + nodes[1:]))


def test_builder_rejects_bad_shapes_and_attrs():
    b = FunctionBuilder("main", {})
    x = b.param("x", TensorType(DType.f32, (2, 3)))
    y = b.param("y", TensorType(DType.f32, (4, 5)))
    with pytest.raises(ValueError, match="inner dims"):
        b.add(ops.MATMUL, [x, y])
    with pytest.raises(TypeError, match="no attribute"):
        b.add(ops.RELU, [x], {"alpha": 1.0})


def test_networkx_view():
    g = to_networkx(small_module().main)
    assert g.nodes["matmul"]["op"] == "matmul"
    assert ("@fc.weight", "matmul") in g.edges
    import networkx as nx

    assert nx.is_directed_acyclic_graph(g)
