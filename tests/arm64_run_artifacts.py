"""Runs under qemu-aarch64 with the aarch64 Python (see test_arm64.py): for each (artifact, inputs,
outputs) triple of arguments, load the artifact with slimgraph.load and save its outputs; a
slimgraph error is written as {"error": code, "message": ...} to the outputs path + ".json"."""

import json
import platform
import sys

import numpy as np

import slimgraph
from slimgraph.compiler.errors import SlimgraphError

assert platform.machine() == "aarch64", platform.machine()
args = sys.argv[1:]
for artifact, inputs, outputs in zip(args[0::3], args[1::3], args[2::3]):
    try:
        model = slimgraph.load(artifact)
        with np.load(inputs) as data:
            results = model(**{name: data[name] for name in data.files})
        np.savez(outputs, *results)
    except SlimgraphError as exc:
        with open(outputs + ".json", "w") as f:
            json.dump({"error": exc.code, "message": str(exc)}, f)
