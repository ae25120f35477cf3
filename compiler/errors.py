"""slimgraph's error hierarchy.

Every failure a user can cause is raised as a :class:`SlimgraphError` subclass carrying a
stable code (``SG-xxx``) and a message that names the file, node or tensor at fault. The CLI
maps each *class* of error to its own exit code, so scripts can tell a usage mistake from a bad
model or an unsupported feature without parsing messages.
"""

from __future__ import annotations


class SlimgraphError(Exception):
    """Base of every error slimgraph reports to a user."""

    code = "SG-000"
    exit_code = 1
    category = "error"

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def to_dict(self) -> dict:
        out = {"code": self.code, "category": self.category, "message": self.message}
        if self.hint:
            out["hint"] = self.hint
        return out

    def __str__(self) -> str:
        text = f"[{self.code}] {self.message}"
        return f"{text}\n  hint: {self.hint}" if self.hint else text


# ----------------------------------------------------------------------------- usage (exit 2)
class UsageError(SlimgraphError):
    """The command line or API call itself is wrong (bad flag value, output exists, ...)."""

    code = "SG-100"
    exit_code = 2
    category = "usage"


class OutputExistsError(UsageError):
    code = "SG-101"


class UnknownPassError(UsageError):
    code = "SG-102"


class UnknownModelError(UsageError):
    code = "SG-103"


class TargetError(UsageError):
    code = "SG-104"


class ShapeSpecError(UsageError):
    code = "SG-105"


class CompressionOptionError(UsageError):
    """A compression setting out of range (sparsity, rank ratio, bits) or a bad recipe file."""

    code = "SG-106"


class RecipeLayerError(UsageError):
    """A recipe rule names a layer the model does not have."""

    code = "SG-107"


class SamplingOptionError(UsageError):
    """A text-generation setting out of range (temperature, top-k, top-p, repetition penalty, ...)."""

    code = "SG-108"


# ----------------------------------------------------------------------------- bad input (exit 3)
class BadInputError(SlimgraphError):
    """A model, artifact or input file is malformed, inconsistent or unsafe."""

    code = "SG-200"
    exit_code = 3
    category = "bad-input"


class ModelLoadError(BadInputError):
    code = "SG-201"


class ExternalDataError(BadInputError):
    code = "SG-202"


class GraphStructureError(BadInputError):
    """Cycles, undefined tensors, duplicate definitions."""

    code = "SG-203"


class ShapeMismatchError(BadInputError):
    code = "SG-204"


class NonFiniteWeightError(BadInputError):
    code = "SG-205"


class UnsafeCheckpointError(BadInputError):
    code = "SG-206"


class ArtifactIntegrityError(BadInputError):
    code = "SG-207"


class RuntimeInputError(BadInputError):
    code = "SG-208"


class IRParseError(BadInputError):
    code = "SG-209"


class CompressionError(BadInputError):
    """A layer cannot be compressed as asked: weights beyond float16 scales, non-finite calibration
    activations, a Hessian that stays singular."""

    code = "SG-211"


class CalibrationError(BadInputError):
    """Calibration data missing, empty, unreadable or not matching the model's inputs."""

    code = "SG-210"


class TuningError(BadInputError):
    """Tuning cannot run: an unreachable RPC tracker, a bad tuning database or budget."""

    code = "SG-212"


class GenerationError(BadInputError):
    """Generation cannot run: an artifact without prefill/decode, a prompt or output beyond the
    compiled context length, text without the model's tokenizer."""

    code = "SG-213"


# ----------------------------------------------------------------------------- unsupported (exit 4)
class UnsupportedError(SlimgraphError):
    """The input is valid but uses something slimgraph does not handle yet."""

    code = "SG-300"
    exit_code = 4
    category = "unsupported"


class UnsupportedOpsError(UnsupportedError):
    """Raised once per model, listing *every* unsupported op with its count and an example node."""

    code = "SG-301"

    def __init__(self, source: str, missing: dict[str, tuple[int, str]]):
        lines = [f"{source}: {len(missing)} unsupported op kind(s):"]
        for op, (count, example) in sorted(missing.items()):
            lines.append(f"  {op}: {count} node(s), e.g. {example}")
        super().__init__("\n".join(lines))
        self.missing = dict(missing)


# ----------------------------------------------------------------------------- internal (exit 5)
class InternalError(SlimgraphError):
    """A bug in slimgraph (or in TVM reached through it): please report it."""

    code = "SG-900"
    exit_code = 5
    category = "internal"


class VerificationError(InternalError):
    """A pass produced a graph that no longer matches the reference numerically or structurally."""

    code = "SG-901"


class BackendError(InternalError):
    """TVM failed while lowering or building; the TVM message is summarized, never dumped raw."""

    code = "SG-902"


EXIT_CODES = {
    "ok": 0,
    "usage": UsageError.exit_code,
    "bad-input": BadInputError.exit_code,
    "unsupported": UnsupportedError.exit_code,
    "internal": InternalError.exit_code,
}
