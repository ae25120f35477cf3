"""All op kinds of slimgraph's IR. Import ops from here: ``from slimgraph.compiler import ops``."""

from slimgraph.compiler.ops.registry import (  # noqa: F401
    OPS, AttrKind, AttrSpec, Attrs, OpCategory, OpDef, RefContext, lookup, register,
)
from slimgraph.compiler.ops.elementwise import *  # noqa: F401,F403
from slimgraph.compiler.ops.elementwise import UNARY_FLOAT_OPS  # noqa: F401
from slimgraph.compiler.ops.reduction import *  # noqa: F401,F403
from slimgraph.compiler.ops.layout import *  # noqa: F401,F403
from slimgraph.compiler.ops.nn import *  # noqa: F401,F403
from slimgraph.compiler.ops.quantization import *  # noqa: F401,F403
from slimgraph.compiler.ops.cache import *  # noqa: F401,F403
