"""Initializers of the EoraLinear tensors: numpy arrays ⇄ ``onnx.TensorProto``.

INT4 tensors are written with packed ``raw_data`` (two codes per byte, element 2j in the
low nibble — the ONNX INT4 layout, the same as :func:`eora_export.quant.pack_int4`). Because
the packing runs along the last dimension of a row-major ``[K, N]`` matrix with N even, the
bytes of an INT4 ``[K, N]`` tensor are exactly the bytes of an INT8 ``[K, N/2]`` container:
re-typing between the two changes only ``data_type`` and ``dims``, never the data (which
also keeps external-data references valid).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper


def pack_int4_np(codes: np.ndarray) -> np.ndarray:
    """int8 codes in [-8, 7], ``[..., n]`` -> uint8 ``[..., n/2]`` (low nibble first)."""
    if codes.shape[-1] % 2:
        raise ValueError(f"cannot pack an odd number ({codes.shape[-1]}) of int4 values per row")
    if codes.size and (codes.min() < -8 or codes.max() > 7):
        raise ValueError("int4 codes must lie in [-8, 7]")
    u = codes.astype(np.uint8) & 0xF
    return (u[..., 0::2] | (u[..., 1::2] << 4)).astype(np.uint8)


def unpack_int4_np(packed: np.ndarray) -> np.ndarray:
    """Inverse of :func:`pack_int4_np`: ``[..., n/2]`` bytes -> int8 ``[..., n]``."""
    p = packed.view(np.uint8) if packed.dtype == np.int8 else packed.astype(np.uint8)
    lo = (p & 0xF).astype(np.int8)
    hi = (p >> 4).astype(np.int8)
    both = np.stack([lo, hi], axis=-1).reshape(*p.shape[:-1], p.shape[-1] * 2)
    return np.where(both > 7, both - 16, both).astype(np.int8)


def int4_tensor(name: str, codes: np.ndarray) -> TensorProto:
    """INT4 ``[K, N]`` initializer from int8 codes ``[K, N]`` (packed raw data)."""
    t = TensorProto()
    t.name = name
    t.data_type = TensorProto.INT4
    t.dims.extend(codes.shape)
    t.raw_data = pack_int4_np(codes).tobytes()
    return t


def array_tensor(name: str, array: np.ndarray) -> TensorProto:
    """An initializer holding ``array`` as raw data (float16, int8, int64, ...)."""
    return numpy_helper.from_array(np.ascontiguousarray(array), name)


def raw_bytes(t: TensorProto) -> bytes:
    """The tensor's data as raw little-endian bytes, whatever field holds it."""
    if t.data_location == TensorProto.EXTERNAL:
        raise ValueError(
            f"initializer {t.name!r} has its data in an external file; load the model with "
            "onnx.load(path, load_external_data=True) first"
        )
    if t.HasField("raw_data"):
        return t.raw_data
    if t.data_type in (TensorProto.INT4, TensorProto.UINT4):
        # Non-raw INT4 stores codes, packed two per int32_data entry by onnx.helper.
        return pack_int4_np(int4_codes(t)).tobytes()
    return numpy_helper.to_array(t).tobytes()


def int4_codes(t: TensorProto) -> np.ndarray:
    """int8 ``[K, N]`` codes of an INT4 initializer."""
    if t.data_type != TensorProto.INT4:
        raise ValueError(f"initializer {t.name!r} is {TensorProto.DataType.Name(t.data_type)}, not INT4")
    if t.HasField("raw_data"):
        flat = unpack_int4_np(np.frombuffer(t.raw_data, np.uint8))
        return flat[: int(np.prod(t.dims))].reshape(tuple(t.dims))
    return np.asarray(numpy_helper.to_array(t)).astype(np.int8)


def retype_int4_as_int8(t: TensorProto) -> TensorProto:
    """INT4 ``[K, N]`` -> INT8 ``[K, N/2]`` container with the same bytes."""
    k, n = t.dims
    out = TensorProto()
    out.CopyFrom(t)
    if t.data_location != TensorProto.EXTERNAL and not t.HasField("raw_data"):
        out.ClearField("int32_data")
        out.raw_data = raw_bytes(t)
    out.data_type = TensorProto.INT8
    del out.dims[:]
    out.dims.extend([k, n // 2])
    return out


def retype_int8_as_int4(t: TensorProto) -> TensorProto:
    """INT8 ``[K, N/2]`` container -> INT4 ``[K, N]`` with the same bytes."""
    k, half = t.dims
    out = TensorProto()
    out.CopyFrom(t)
    if t.data_location != TensorProto.EXTERNAL and not t.HasField("raw_data"):
        out.ClearField("int32_data")
        out.raw_data = raw_bytes(t)
    out.data_type = TensorProto.INT4
    del out.dims[:]
    out.dims.extend([k, half * 2])
    return out


def to_numpy(t: TensorProto) -> np.ndarray:
    """numpy view of an initializer; INT4 comes back as int8 codes."""
    if t.data_type == TensorProto.INT4:
        return int4_codes(t)
    return numpy_helper.to_array(t)


def dtype_name(t: TensorProto) -> str:
    return onnx.TensorProto.DataType.Name(t.data_type)
