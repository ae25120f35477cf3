"""slimgraph: compress trained models and compile them through Apache TVM.

Top-level API::

    import slimgraph
    model = slimgraph.load("out/minilm")          # a compiled artifact directory
    outputs = model(input_ids=ids, attention_mask=mask)
"""

from __future__ import annotations

__version__ = "0.1.0"


def load(path, **kwargs):
    """Load a compiled artifact directory; returns a callable taking inputs by name or position."""
    from slimgraph.backends.runner import load_artifact

    return load_artifact(path, **kwargs)


def compile(model, **kwargs):  # noqa: A001 - mirrors the CLI verb
    """Compile a model (path, short name, torch module or ExportedProgram); see compiler.driver.compile_model."""
    from slimgraph.compiler.driver import compile_model

    return compile_model(model, **kwargs)
