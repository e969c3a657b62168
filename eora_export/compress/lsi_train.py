"""LSI training (:mod:`.lsi` holds the math): one decoder block at a time, OmniQuant's scheme.

:func:`train_block` trains one block's δ and γ against the FP block's outputs; the engine calls
it through :func:`lsi_requantize` (``--method lsi`` / ``lsi+eora``, registered here), and
:func:`lsi_compress` drives it over a whole in-memory model (tests, tools/lsi_demo.py).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from ..errors import BadInput, UsageError
from ..methods import BlockInputs, Method, register
from ..quant import QuantizedMatrix, check_group
from . import CompressedLinear
from .lsi import FP32_STREAM_LIMIT_BYTES, LsiConfig, LsiLinear, _FixedLinear, initial_clip, lsi_weight

log = logging.getLogger("eora_export.compress.lsi")


# --------------------------------------------------------------------------------------
# Block-wise training
# --------------------------------------------------------------------------------------


class _StopForward(Exception):
    """Raised by the capture hook: nothing past the first decoder block is needed."""


def decoder_layers(model: nn.Module) -> tuple[nn.ModuleList, str]:
    """The decoder blocks of a Llama-style causal LM and their qualified prefix (``model.layers``)."""
    for name, mod in model.named_modules():
        if name.endswith("layers") and isinstance(mod, nn.ModuleList) and len(mod) > 0:
            return mod, name
    raise BadInput("no decoder layers (a ModuleList named '*.layers') found; LSI supports Llama-style models")


def _block_of(names: list[str], prefix: str, n_layers: int) -> list[list[str]]:
    by_block: list[list[str]] = [[] for _ in range(n_layers)]
    for name in names:
        head = prefix + "."
        idx = name[len(head) :].split(".", 1)[0] if name.startswith(head) else ""
        if not idx.isdigit() or int(idx) >= n_layers:
            raise UsageError(f"{name} is not inside a decoder block ({prefix}.N); LSI trains decoder Linears only")
        by_block[int(idx)].append(name)
    return by_block


def _stream_dtype(cfg: LsiConfig, n: int, seq: int, hidden: int, compute: torch.dtype) -> torch.dtype:
    if cfg.activations == "float16":
        return torch.float16
    if cfg.activations == "float32":
        return compute
    return torch.float16 if 2 * n * seq * hidden * 4 > FP32_STREAM_LIMIT_BYTES else compute


@torch.no_grad()
def _capture_block_inputs(
    model: nn.Module, first: nn.Module, windows: Tensor, batch_size: int, cfg: LsiConfig
) -> tuple[Tensor, dict[int, dict]]:
    """Hidden states entering the first decoder block ``[n, seq, hidden]`` and the keyword
    arguments the model passes to its blocks (rotary embeddings, mask), per batch size.

    Every window has the same length and no padding (calibration.token_windows), so the
    arguments depend on the batch size at most. The stream lives in CPU memory; batches
    move to the model's device when they are used.
    """
    store: dict[str, object] = {}

    def hook(_mod: nn.Module, args: tuple, kwargs: dict) -> None:
        store["x"] = args[0] if args else kwargs["hidden_states"]
        store["kw"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        raise _StopForward

    device = next(first.parameters()).device
    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    stream: Tensor | None = None
    kwargs_by_bs: dict[int, dict] = {}
    try:
        for i in range(0, windows.shape[0], batch_size):
            ids = windows[i : i + batch_size]
            try:
                model(ids.to(device), use_cache=False)
            except _StopForward:
                pass
            x = store["x"]
            assert isinstance(x, Tensor)
            if stream is None:
                dtype = _stream_dtype(cfg, windows.shape[0], x.shape[1], x.shape[2], x.dtype)
                stream = torch.empty(windows.shape[0], x.shape[1], x.shape[2], dtype=dtype)
            stream[i : i + ids.shape[0]] = x.cpu()
            kw = dict(store["kw"])  # type: ignore[arg-type]
            for key in ("cache", "past_key_values", "past_key_value"):  # the name moved across transformers releases
                if key in kw:
                    kw[key] = None  # no cache: each replay recomputes the block on its own
            kw["use_cache"] = False
            kwargs_by_bs.setdefault(ids.shape[0], kw)
    finally:
        handle.remove()
    assert stream is not None
    return stream, kwargs_by_bs


def _run_block(block: nn.Module, x: Tensor, kwargs: dict, dtype: torch.dtype) -> Tensor:
    """block(x) for x: [b, seq, hidden] (any device/dtype) on the block's device, in ``dtype``."""
    out = block(x.to(next(block.parameters()).device, dtype), **kwargs)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def _propagate(forward: Callable[[Tensor], Tensor], stream: Tensor, batch_size: int) -> None:
    """stream[j] <- forward(stream[j]) in place, batch by batch ([n, seq, hidden])."""
    for i in range(0, stream.shape[0], batch_size):
        stream[i : i + batch_size] = forward(stream[i : i + batch_size]).to("cpu", stream.dtype)


@torch.no_grad()
def _stream_mse(forward: Callable[[Tensor], Tensor], q: Tensor, target: Tensor, batch_size: int) -> float:
    """Mean squared error of forward(q) against target over all windows."""
    total, count = 0.0, 0
    for i in range(0, q.shape[0], batch_size):
        y = forward(q[i : i + batch_size])
        total += float((y.float() - target[i : i + batch_size].to(y.device).float()).square().sum())
        count += y.numel()
    return total / max(count, 1)


def _swap(block: nn.Module, prefix: str, modules: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """Put ``modules`` (qualified names under ``prefix.``) into ``block``; return the old ones."""
    from ..models import set_module

    return {n: set_module(block, n[len(prefix) + 1 :], m) for n, m in modules.items()}


def train_block(
    forward: Callable[[Tensor], Tensor],
    install: Callable[[dict[str, nn.Module]], dict[str, nn.Module]],
    wrappers: dict[str, LsiLinear],
    biases: dict[str, Tensor | None],
    q: Tensor,
    target: Tensor,
    cfg: LsiConfig,
    gen: torch.Generator,
    label: str = "lsi",
) -> tuple[dict[str, QuantizedMatrix], dict]:
    """Train one block's LSI parameters; return (exported weights by name, stats).

    forward(x [b, seq, h]) -> [b, seq, h]: the block (gradients flow through it); install(mods):
    put modules into the block by qualified name, returning the ones it replaced. wrappers:
    the block's target Linears as :class:`LsiLinear`. q: the inputs from the already quantized
    blocks, target: the FP block's outputs, both ``[n, seq, h]``. The block is left as found.
    A block whose calibration MSE ends above its start keeps its starting weights, so LSI
    never ships a block worse (on its data) than where it started.
    """
    t0 = time.perf_counter()
    n_win = q.shape[0]
    params = [p for m in wrappers.values() for p in m.parameters()]
    old = install(wrappers)
    try:
        mse_start = _stream_mse(forward, q, target, cfg.batch_size)
        # The loss is the MSE relative to the target's power: Adam is scale-free, but its
        # epsilon is not, and block outputs differ by orders of magnitude across models.
        power = max(sum(float(c.float().square().sum()) for c in target.split(cfg.batch_size)) / target.numel(), 1e-30)
        groups = [{"params": [m.eps for m in wrappers.values()], "lr": cfg.lr}]
        if cfg.use_clip:
            groups.append({"params": [m.gamma for m in wrappers.values()], "lr": cfg.clip_lr})
        opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
        steps = math.ceil(n_win / cfg.batch_size)
        bar = tqdm(total=cfg.epochs * steps, desc=label, unit="step", disable=not cfg.progress, leave=False)
        for _ in range(cfg.epochs):
            perm = torch.randperm(n_win, generator=gen)
            for j in range(0, n_win, cfg.batch_size):
                idx = perm[j : j + cfg.batch_size]
                with torch.enable_grad():
                    y = forward(q[idx])
                    loss = F.mse_loss(y.float(), target[idx].to(y.device).float()) / power
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                opt.step()
                bar.update(1)
                bar.set_postfix(rel_mse=f"{loss.item():.3e}", start=f"{mse_start / power:.3e}")
        bar.close()
        exported = {n: m.export() for n, m in wrappers.items()}
        # The loss of the weights we ship: the exported weights in the block.
        install({n: _FixedLinear(exported[n].dequantize(), biases[n]) for n in wrappers})
        mse_end = _stream_mse(forward, q, target, cfg.batch_size)
        if mse_end > mse_start:
            # Training made this block worse on its own data (an unlucky STE run): ship the
            # starting weights instead, so LSI never ends behind where it started.
            log.warning("%s: MSE rose %.4e -> %.4e; keeping the starting weights", label, mse_start, mse_end)
            with torch.no_grad():
                for m in wrappers.values():
                    m.eps.zero_()
                    if m.gamma is not None:
                        m.gamma.zero_()
            exported = {n: m.export() for n, m in wrappers.items()}
            mse_end = mse_start
    finally:
        install(old)
        for p in params:
            p.grad = None
    return exported, {"mse_start": mse_start, "mse_end": mse_end, "seconds": time.perf_counter() - t0}


def _description(cfg: LsiConfig) -> str:
    """``CompressedLinear.method`` of LSI weights, e.g. "lsi int3 g128 lwc 5ep"."""
    return f"lsi int{cfg.bits} g{cfg.group_size}" + (" lwc" if cfg.use_clip else "") + f" {cfg.epochs}ep"


def _start(lin: nn.Module, start: QuantizedMatrix | None, cfg: LsiConfig) -> LsiLinear:
    """The trainable stand-in of ``lin``, starting from the scales of ``start`` (a base quantization),
    or from plain RTN (clip 1.0) without one."""
    clip0 = None
    if start is not None and start.scale is not None:
        clip0 = initial_clip(lin.weight, start.scale, cfg.bits, cfg.group_size)
    return LsiLinear(lin.weight, lin.bias, cfg.bits, cfg.group_size, cfg.use_clip, clip0)


def lsi_compress(
    model: nn.Module,
    linears: dict[str, nn.Linear],
    cfg: LsiConfig,
    calib_windows: Tensor,
    base: dict[str, CompressedLinear] | None = None,
    stats: list[dict] | None = None,
    targets: dict[str, Tensor] | None = None,
) -> dict[str, CompressedLinear]:
    """Quantize ``linears`` (name -> nn.Linear of ``model``) with LSI, block by block.

    model: the full-precision causal LM (left unchanged on return); calib_windows: int64
    ``[n, seq]`` token windows. base: an earlier :func:`~eora_export.compress.compress_model`
    result for the same Linears, or None. With a base, each weight starts from the base's
    scales (e.g. RTN with clip search, or AWQ on an AWQ-folded model) and the codes are
    recomputed from the FP weight; without one it starts from plain RTN (clip 1.0). A
    2:4-sparse base is refused. stats: if given, one dict per trained block is appended
    (block, linears, mse_start, mse_end, seconds). targets: if given, filled with each
    Linear's learned continuous weight W' = U diag(σ + δ) Vᵀ (float32 [out, in]).

    Returns name -> CompressedLinear(weight=QuantizedMatrix [out, in], reference = the FP
    weight float32 [out, in], sparse24=False), like compress_model. With ``cfg.epochs == 0``
    the weights are exactly the starting ones (``quant.quantize(w, bits, group)`` without
    a base).
    """
    cfg.validate()
    names = list(linears)
    if not names:
        raise UsageError("no Linear layers for LSI")
    base = base or {}
    for n in names:
        w = linears[n].weight
        if w.dim() != 2 or not torch.isfinite(w).all():
            raise BadInput(f"{n} has a non-finite or non-2-D weight; LSI needs a Linear [out, in]")
        check_group(w.shape[1], cfg.group_size, n)
        b = base.get(n)
        if b is None:
            continue
        if b.sparse24:
            raise UsageError(
                f"LSI does not support 2:4-sparse weights ({n}); use --sparsity none with --method lsi/lsi+eora, "
                "or EoRA alone on the sparse model"
            )
        if b.weight.bits != cfg.bits or b.weight.group_size != cfg.group_size:
            raise UsageError(
                f"the base quantization of {n} (int{b.weight.bits} g{b.weight.group_size}) does not match "
                f"LSI's (int{cfg.bits} g{cfg.group_size}); give both the same --bits and --group-size"
            )
        if b.reference.shape != w.shape or not torch.allclose(b.reference, w.detach().float(), rtol=1e-3, atol=1e-6):
            raise UsageError(f"the model's {n} weight is not the base's FP reference; pass the uncompressed model")

    layers, prefix = decoder_layers(model)
    by_block = _block_of(names, prefix, len(layers))
    gen = torch.Generator().manual_seed(cfg.seed)
    result: dict[str, CompressedLinear] = {}
    method = _description(cfg)

    def make(name: str) -> LsiLinear:
        return _start(linears[name], base[name].weight if name in base else None, cfg)

    if cfg.epochs == 0:
        # No training: the export of the untouched parameters (δ = 0, γ = 0), i.e. the start.
        for n in names:
            result[n] = CompressedLinear(make(n).export(), linears[n].weight.detach().float().clone(), False, method)
        return result

    last = max(i for i, blk in enumerate(by_block) if blk)
    dtype = next(layers[0].parameters()).dtype
    fp, kwargs_by_bs = _capture_block_inputs(model, layers[0], calib_windows, cfg.batch_size, cfg)
    q = fp.clone()
    for i in range(last + 1):
        block = layers[i]

        def forward(x: Tensor, block: nn.Module = block) -> Tensor:
            return _run_block(block, x, kwargs_by_bs[x.shape[0]], dtype)

        if not by_block[i]:
            # Nothing to quantize here: both streams go through the FP block.
            _propagate(forward, fp, cfg.batch_size)
            _propagate(forward, q, cfg.batch_size)
            continue
        # Target, written over the FP stream (its inputs are not needed again): the FP block on
        # the FP inputs, or with target="local" on the quantized inputs.
        if cfg.target == "local":
            fp.copy_(q)
        _propagate(forward, fp, cfg.batch_size)
        wrappers = {n: make(n) for n in by_block[i]}
        grad_flags = {p: p.requires_grad for p in block.parameters()}
        for p in block.parameters():
            p.requires_grad_(False)  # only δ and γ learn; no gradients for the frozen block
        try:
                exported, stat = train_block(forward, lambda mods, b=block, i=i: _swap(b, f"{prefix}.{i}", mods), wrappers,
                                         {n: linears[n].bias for n in wrappers}, q, fp, cfg, gen, f"lsi block {i + 1}/{last + 1}")
        finally:
            for p, flag in grad_flags.items():
                p.requires_grad_(flag)
        if i < last:
            fixed = {n: _FixedLinear(exported[n].dequantize(), linears[n].bias) for n in wrappers}
            old = _swap(block, f"{prefix}.{i}", fixed)
            try:
                _propagate(forward, q, cfg.batch_size)
            finally:
                _swap(block, f"{prefix}.{i}", old)
        if targets is not None:
            with torch.no_grad():
                targets.update({n: lsi_weight(m.w, m.u, m.vh, m.delta()) for n, m in wrappers.items()})
        for n in by_block[i]:
            result[n] = CompressedLinear(exported[n], linears[n].weight.detach().float().clone(), False, method)
        log.info("LSI block %d: output MSE %.4e (start) -> %.4e in %.1f s", i, stat["mse_start"], stat["mse_end"], stat["seconds"])
        if stats is not None:
            stats.append({"block": i, "linears": list(by_block[i]), **stat})
    return {n: result[n] for n in names}


# --------------------------------------------------------------------------------------
# In the engine: LSI as a re-quantizer of one block, and the methods that use it
# --------------------------------------------------------------------------------------


def lsi_requantize(inputs: BlockInputs) -> dict[str, CompressedLinear]:
    """LSI-retrained weights of one block (``inputs.compressed``: the compressor's result, whose
    scales are the start). Inputs: ``inputs.own_inputs``, what the LSI-quantized blocks before
    produce (OmniQuant's scheme); target: the FP block on the FP inputs (``inputs.fp_out``)."""
    from .. import models

    run = inputs.run
    cfg = LsiConfig(bits=run.bits, group_size=run.group_size, epochs=run.lsi_epochs, lr=run.lsi_lr,
                    seed=run.seed, progress=inputs.progress)
    cfg.validate()
    gen = torch.Generator().manual_seed(run.seed * 1_000_003 + inputs.block)  # the same draws after --resume
    method = _description(cfg)
    wrappers = {}
    for n, lin in inputs.linears.items():
        check_group(lin.weight.shape[1], cfg.group_size, n)
        wrappers[n] = _start(lin, inputs.compressed[n].weight, cfg)
    q = inputs.own_inputs if inputs.own_inputs is not None else inputs.calib
    if cfg.epochs == 0:
        exported = {n: m.export() for n, m in wrappers.items()}
    else:
        exported, stat = train_block(
            inputs.host, lambda mods: {n: models.set_module(inputs.host, n, m) for n, m in mods.items()}, wrappers,
            dict(inputs.biases), q, inputs.fp_out, cfg, gen, f"lsi block {inputs.block}")
        log.info("LSI block %d: output MSE %.4e (start) -> %.4e in %.1f s", inputs.block, stat["mse_start"],
                 stat["mse_end"], stat["seconds"])
    return {n: CompressedLinear(exported[n], inputs.linears[n].weight.detach().float().clone(), False, method)
            for n in inputs.linears}


def _check_lsi(cfg) -> None:
    if cfg.sparsity != "none":
        raise UsageError("--method lsi trains quantized weights and does not keep a 2:4 mask; use --sparsity none")
    if cfg.quant == "none":
        raise UsageError("--method lsi needs a weight quantizer (--quant rtn, gptq or awq) to start from")


def _register() -> None:
    from ..compensate.layerwise import layerwise

    register(Method("lsi", "LSI: learnable singular-value increments, the quantized weights retrained block by block",
                    layerwise("none"), requantize=lsi_requantize, requantizer="lsi", uses_rank=False,
                    check=_check_lsi))
    register(Method("lsi+eora", "LSI, then EoRA on the error that remains", layerwise("eora"), requantize=lsi_requantize,
                    requantizer="lsi", parts=("lsi",), check=_check_lsi))


_register()
