"""ONNX tensors -> numpy: dtypes, safe external data (memory-mapped) and the non-finite check.

External data is resolved by slimgraph itself, never by ``onnx.load``: each tensor's ``location``
must be a relative path that stays inside the model's folder after resolving ``..`` and symlinks,
the file must exist and hold ``offset + length`` bytes. The data is then memory-mapped, so a large
model's weights are paged in on use instead of being read into memory.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
from onnx import numpy_helper

from slimgraph.compiler.errors import ExternalDataError, ModelLoadError, NonFiniteWeightError, UnsupportedError
from slimgraph.compiler.types import DType

P = onnx.TensorProto
ONNX_DTYPES = {
    P.FLOAT: DType.f32, P.FLOAT16: DType.f16, P.DOUBLE: DType.f64, P.INT8: DType.i8, P.UINT8: DType.u8,
    P.INT16: DType.i16, P.INT32: DType.i32, P.INT64: DType.i64, P.BOOL: DType.bool,
}
FINITE_CHECK_CHUNK = 1 << 22


def ir_dtype(elem_type: int, what: str) -> DType:
    """The IR dtype of an ONNX element type; unsupported ones (bfloat16, string, ...) name the tensor."""
    dtype = ONNX_DTYPES.get(elem_type)
    if dtype is None:
        kind = P.DataType.Name(elem_type) if elem_type in P.DataType.values() else str(elem_type)
        raise UnsupportedError(f"{what}: element type {kind} is not supported "
                               f"(supported: {', '.join(sorted(P.DataType.Name(k) for k in ONNX_DTYPES))})")
    return dtype


def _external_fields(tensor: onnx.TensorProto) -> dict[str, str]:
    return {entry.key: entry.value for entry in tensor.external_data}


def resolve_external(tensor: onnx.TensorProto, model_dir: str, source: str) -> tuple[str, int, int | None]:
    """Validate an external tensor's location; returns (absolute file, offset, length or None)."""
    fields = _external_fields(tensor)
    where = f"{source}: initializer {tensor.name!r}"
    location = fields.get("location", "")
    if not location:
        raise ExternalDataError(f"{where}: external data has no location")
    if os.path.isabs(location) or location.startswith(("/", "\\")) or os.path.splitdrive(location)[0]:
        raise ExternalDataError(f"{where}: external data location {location!r} is an absolute path; "
                                "it must be relative to the model's folder")
    try:
        base = os.path.realpath(model_dir)
        full = os.path.realpath(os.path.join(base, location))
        inside = os.path.commonpath([base, full]) == base
    except (ValueError, OSError) as exc:  # NUL bytes, mixed drives, unreadable links
        raise ExternalDataError(f"{where}: external data location {location!r} is invalid: {exc}") from None
    if not inside:
        raise ExternalDataError(f"{where}: external data location {location!r} resolves to {full}, "
                                f"outside the model folder {base}")
    if not os.path.isfile(full):
        raise ExternalDataError(f"{where}: external data file {location!r} not found in {base}")
    try:
        offset = int(fields.get("offset", 0))
        length = int(fields["length"]) if "length" in fields else None
    except ValueError:
        raise ExternalDataError(f"{where}: external data offset/length are not integers: {fields}") from None
    size = os.path.getsize(full)
    if offset < 0 or offset + (length or 0) > size:
        raise ExternalDataError(f"{where}: external data [{offset}, {offset + (length or 0)}) lies beyond the end "
                                f"of {location!r} ({size} bytes)")
    return full, offset, length


def _memmap_external(tensor: onnx.TensorProto, model_dir: str, source: str) -> np.ndarray:
    full, offset, length = resolve_external(tensor, model_dir, source)
    dtype = ir_dtype(tensor.data_type, f"{source}: initializer {tensor.name!r}").numpy.newbyteorder("<")
    shape = tuple(int(d) for d in tensor.dims)
    count = int(np.prod(shape, dtype=np.int64))
    nbytes = count * dtype.itemsize
    if (length is not None and length != nbytes) or offset + nbytes > os.path.getsize(full):
        raise ExternalDataError(f"{source}: initializer {tensor.name!r}: external data holds "
                                f"{length if length is not None else 'too few'} bytes, shape {list(shape)} "
                                f"needs {nbytes}")
    if count == 0:
        return np.zeros(shape, dtype)
    data = np.memmap(full, dtype=dtype, mode="r", offset=offset, shape=(count,))
    return data.view(np.ndarray).reshape(shape)


def tensor_to_array(tensor: onnx.TensorProto, model_dir: str, source: str, what: str = "initializer") -> np.ndarray:
    """A numpy array for an initializer or a Constant's tensor (external data is memory-mapped)."""
    ir_dtype(tensor.data_type, f"{source}: {what} {tensor.name!r}")
    if tensor.data_location == P.EXTERNAL:
        return _memmap_external(tensor, model_dir, source)
    try:
        return numpy_helper.to_array(tensor)
    except Exception as exc:  # a malformed protobuf payload (wrong byte count for its dims, ...)
        raise ModelLoadError(f"{source}: {what} {tensor.name!r} cannot be decoded: {exc}") from None


def check_finite(name: str, array: np.ndarray, source: str) -> None:
    """Raise NonFiniteWeightError naming the tensor when a float weight holds NaN or Inf (chunked scan)."""
    if array.dtype.kind != "f":
        return
    flat = array.reshape(-1)
    for start in range(0, flat.size, FINITE_CHECK_CHUNK):
        chunk = flat[start:start + FINITE_CHECK_CHUNK]
        bad = ~np.isfinite(chunk)
        if bad.any():
            first = start + int(np.argmax(bad))
            total = int(bad.sum()) + sum(int((~np.isfinite(flat[s:s + FINITE_CHECK_CHUNK])).sum())
                                         for s in range(start + FINITE_CHECK_CHUNK, flat.size, FINITE_CHECK_CHUNK))
            raise NonFiniteWeightError(f"{source}: initializer {name!r} has {total} non-finite value(s); "
                                       f"first at flat index {first} ({flat[first]})")


def external_tensors(model: onnx.ModelProto):
    """Every tensor of the main graph that may carry external data: initializers and Constant values."""
    yield from model.graph.initializer
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t


def check_external_locations(model: onnx.ModelProto, model_dir: str, source: str) -> None:
    """Validate every external-data location before anything is read."""
    for tensor in external_tensors(model):
        if tensor.data_location == P.EXTERNAL:
            resolve_external(tensor, model_dir, source)
