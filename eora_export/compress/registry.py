"""The registries of weight quantizers and 2:4 sparsifiers, by the name ``--quant`` / ``--sparsity`` gives.

A quantizer is a :class:`Quantizer`: a function rounding one Linear's (sparse, possibly
folded) weight to a :class:`~eora_export.quant.QuantizedMatrix`, and optionally a model-level
``fold`` run first (AWQ's function-preserving scales). A sparsifier is a :class:`Sparsifier`
returning the 2:4-sparse weights and their masks. :func:`eora_export.compress.compress_model`
looks both up here; the CLI choices and the config validation read :func:`quant_choices` /
:func:`sparsity_choices`.

Adding one touches two files: its own module, and one ``register_quantizer(Quantizer(...))``
(or ``register_sparsifier``) line in ``compress/__init__.py``, whose order is the CLI's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor

NO_QUANT = "none"  # keep the (sparse) weights in float16
NO_SPARSITY = "none"


@dataclass(frozen=True)
class LayerJob:
    """One Linear to quantize: its name, its weight to round ``[out, in]`` float32, the lazy Gram
    of its input, and the 2:4 mask to keep (None when not sparse)."""

    name: str
    weight: Tensor
    gram: Callable[[], Tensor]
    keep: Tensor | None


@dataclass(frozen=True)
class Quantizer:
    """quantize(job, cfg: CompressConfig) -> QuantizedMatrix.

    fold(model, names, grams, work, ref, cfg) -> name -> fold record: an optional model-level step
    before quantization that rewrites ``work`` / ``ref`` in place and keeps the FP model's
    function (compress_model then writes the folded weights back into the model).
    """

    name: str
    quantize: Callable[[LayerJob, Any], Any]
    needs_gram: bool = False
    fold: Callable[..., dict] | None = None


@dataclass(frozen=True)
class Sparsifier:
    """sparsify(model, names, ref, grams, calib_windows, backend) -> (sparse weights, masks, what ran)."""

    name: str
    sparsify: Callable[..., tuple[dict[str, Tensor], dict[str, Tensor], str]]
    needs_gram: bool = False


QUANTIZERS: dict[str, Quantizer] = {}
SPARSIFIERS: dict[str, Sparsifier] = {}


def register_quantizer(q: Quantizer) -> Quantizer:
    if q.name in QUANTIZERS or q.name == NO_QUANT:
        raise ValueError(f"quantizer {q.name!r} is already registered")
    QUANTIZERS[q.name] = q
    return q


def register_sparsifier(s: Sparsifier) -> Sparsifier:
    if s.name in SPARSIFIERS or s.name == NO_SPARSITY:
        raise ValueError(f"sparsifier {s.name!r} is already registered")
    SPARSIFIERS[s.name] = s
    return s


def quant_choices() -> tuple[str, ...]:
    """``--quant`` values, in registration order, then ``none``."""
    return (*QUANTIZERS, NO_QUANT)


def sparsity_choices() -> tuple[str, ...]:
    """``--sparsity`` values: ``none``, then the sparsifiers in registration order."""
    return (NO_SPARSITY, *SPARSIFIERS)
