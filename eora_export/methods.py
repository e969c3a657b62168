"""The registry of compensation methods: what ``--method`` can name, found by name as peft
finds its tuners.

A method is a :class:`Method`: a function that compensates one decoder block's compressed
Linears (``compensate``), optionally after a re-quantizer that retrains the quantized weights
first (``requantize``, e.g. LSI). The engine calls them block by block with a
:class:`BlockInputs`; the CLI choices, the report rows, the plots and ``--verify``'s list come
from :data:`METHODS`.

Adding a method: write its file with a ``register(Method(...))`` call and add the file to
:data:`METHOD_MODULES` below (two files in all).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import Tensor, nn

from .errors import UsageError

# The modules that register methods, imported on first use of the registry.
METHOD_MODULES = (
    "eora_export.compensate.layerwise",  # none, svd, eora
    "eora_export.compensate.feedback",  # eora-fb
    "eora_export.compensate.alternating",  # eora-alt
    "eora_export.compress.lsi_train",  # lsi, lsi+eora
)


@dataclass
class BlockInputs:
    """What one decoder block offers a method.

    host: the block (``engine.block.BlockHost``): ``forward(hidden [b, seq, h]) -> [b, seq, h]``.
    linears: its target Linears by qualified name (full-precision weights; AWQ-folded with AWQ).
    compressed: name -> ``compress.CompressedLinear`` (the re-quantizer's, for methods that have one).
    grams: ``calibration.GramStore`` of the block's calibration inputs.
    calib: the block's calibration inputs ``[n, seq, h]``; fp_out: the FP block's outputs on them.
    own_inputs: the inputs this method's own path produces (``Method.own_stream``), else None.
    run: the run's ``config.RunConfig``; block: the block's index. cache: shared by every method
    of this block (e.g. the Gram roots, ``cache["roots"]``), dropped with the block.
    """

    host: nn.Module
    linears: dict[str, nn.Module]
    compressed: dict
    grams: object
    calib: Tensor
    fp_out: Tensor
    biases: dict[str, Tensor | None]
    run: object
    block: int
    own_inputs: Tensor | None = None
    progress: bool = False
    cache: dict = field(default_factory=dict)


# compensate(inputs, comp: compensate.apply.CompensationConfig, ranks: name -> rank or None) -> name -> LayerResult
Compensate = Callable[[BlockInputs, object, "dict[str, int] | None"], dict]
# requantize(inputs) -> name -> CompressedLinear (inputs.own_inputs: the re-quantized path's inputs)
Requantize = Callable[[BlockInputs], dict]


@dataclass(frozen=True)
class Method:
    name: str
    help: str
    compensate: Compensate
    requantize: Requantize | None = None
    requantizer: str = ""  # name of the re-quantizer (its path's inputs are shared by the methods using it)
    own_stream: bool = False  # fitted on the inputs of its own compressed+compensated upstream
    compare: tuple[str, ...] = ("svd", "eora")  # evaluated beside it unless --no-compare
    parts: tuple[str, ...] = ()  # always evaluated beside it (what it builds on, e.g. lsi for lsi+eora)
    uses_rank: bool = True  # adds factors (rank > 0)
    allocates: bool = False  # takes per-layer ranks from --rank-budget
    sweeps: bool = False  # part of the KL/perplexity-vs-rank sweep
    plain_error: bool = False  # its error_before is tr(ΔW G ΔWᵀ) of the compressor's W_c (the report's "before")
    check: Callable[[object], None] = field(default=lambda cfg: None)  # rules on the RunConfig


METHODS: dict[str, Method] = {}
_ORIGIN: dict[str, str] = {}  # method -> the module that registered it


def register(method: Method) -> Method:
    if method.name in METHODS and METHODS[method.name] is not method:
        raise ValueError(f"compensation method {method.name!r} is registered twice")
    METHODS[method.name] = method
    _ORIGIN[method.name] = sys._getframe(1).f_globals.get("__name__", "")
    return method


def _load() -> None:
    for module in METHOD_MODULES:
        importlib.import_module(module)


def method_names() -> tuple[str, ...]:
    """Every method, in METHOD_MODULES order then registration order (the CLI's order)."""
    _load()
    rank = {m: i for i, m in enumerate(METHOD_MODULES)}
    return tuple(sorted(METHODS, key=lambda n: rank.get(_ORIGIN[n], len(rank))))


def get_method(name: str) -> Method:
    _load()
    if name not in METHODS:
        raise UsageError(f"unknown --method {name}; use one of {', '.join(METHODS)}")
    return METHODS[name]
