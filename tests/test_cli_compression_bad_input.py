"""Bad compression input from the command line: the right exit code and error code, a message
naming the setting, file or layer, no traceback, and no output directory left behind."""

import json
import subprocess
import sys

import numpy as np
import pytest


def compile_cli(out, *flags):
    proc = subprocess.run([sys.executable, "-m", "slimgraph.compiler.cli", "compile", "tiny-llama", "-o", str(out),
                           "--json", *flags], capture_output=True, text=True, timeout=600)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert not out.exists(), "partial output left behind"
    error = json.loads(proc.stdout)["error"]
    return proc.returncode, error["code"], error["message"]


def empty_text(tmp_path):
    (tmp_path / "empty.txt").write_text("  \n")
    return ["--quantize", "int4", "--method", "gptq", "--calib", str(tmp_path / "empty.txt")]


def npz_without_inputs(tmp_path):
    np.savez(tmp_path / "calib.npz", wrong_name=np.ones((1, 4), np.int64))
    return ["--prune", "0.5", "--prune-method", "wanda", "--calib", str(tmp_path / "calib.npz")]


def recipe_with_unknown_layer(tmp_path):
    (tmp_path / "r.toml").write_text('[quantize]\nbits = 4\n[[rules]]\nmatch = "model.nowhere.*"\nquantize = false\n')
    return ["--recipe", str(tmp_path / "r.toml")]


def recipe_with_unknown_setting(tmp_path):
    (tmp_path / "r.toml").write_text('[prune]\nsparsity = 0.5\nflavour = "mint"\n')
    return ["--recipe", str(tmp_path / "r.toml")]


CASES = {
    # name: (flags or a function of tmp_path returning flags, exit code, error code, words in the message)
    "sparsity above 1": (["--prune", "1.5"], 2, "SG-106", ["--prune", "1.5"]),
    "sparsity zero": (["--prune", "0"], 2, "SG-106", ["(0, 1)"]),
    "rank ratio out of range": (["--lowrank", "1.2"], 2, "SG-106", ["--lowrank", "1.2"]),
    "energy out of range": (["--lowrank-energy", "0"], 2, "SG-106", ["energy"]),
    "unknown bit width": (["--quantize", "int7"], 2, "SG-106", ["--bits", "7"]),
    "tiny group": (["--quantize", "int4", "--group-size", "4"], 2, "SG-106", ["--group-size"]),
    "bad N:M": (["--prune-n-m", "4:2"], 2, "SG-106", ["4:2"]),
    "unknown method": (["--quantize", "int4", "--method", "magic"], 2, "SG-106", ["magic"]),
    "GPTQ without calibration data": (["--quantize", "int4", "--method", "gptq"], 3, "SG-210", ["tokenizer", "--calib"]),
    "missing calibration file": (["--quantize", "int4", "--method", "awq", "--calib", "/nonexistent/c.txt"],
                                 3, "SG-210", ["/nonexistent/c.txt"]),
    "empty calibration text": (empty_text, 3, "SG-210", ["empty.txt", "empty"]),
    "npz without the model's inputs": (npz_without_inputs, 3, "SG-210", ["calib.npz", "input_ids"]),
    "recipe naming no layer": (recipe_with_unknown_layer, 2, "SG-107", ["model.nowhere.*"]),
    "recipe with an unknown setting": (recipe_with_unknown_setting, 2, "SG-106", ["flavour"]),
    "unknown activation format": (["--quantize", "int4", "--quantize-activations", "int4"], 2, "SG-106",
                                  ["--quantize-activations", "int4"]),
    "activation codes without quantized weights": (["--quantize-activations", "int8"], 2, "SG-106",
                                                   ["--quantize-activations", "--quantize"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_compression_input(case, tmp_path):
    flags, exit_code, code, words = CASES[case]
    flags = flags(tmp_path) if callable(flags) else flags
    got_exit, got_code, message = compile_cli(tmp_path / "out", *flags)
    assert (got_exit, got_code) == (exit_code, code), message
    for word in words:
        assert word in message, message
