"""One decoder block as a module of its own, and the passes the engine makes through it.

:class:`BlockHost` places decoder layer ``i`` at ``model.layers.{i}`` so qualified names match
the full model's (Gram keys, --only/--skip patterns, AWQ's layer lookup, adapter keys) and
runs it on hidden states with the mask and rotary positions the full model would give it.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

from ..calibration import GramCollector, GramStore
from ..errors import BadInput
from ..models import is_target, selected


class BlockHost(nn.Module):
    """One decoder layer placed at ``model.layers.{i}`` so qualified names match the full
    model's (Gram keys, --only/--skip patterns, AWQ's layer lookup, adapter keys).

    ``forward(hidden: [b, seq, hidden]) -> [b, seq, hidden]`` (the layer's dtype): runs the
    layer with causal attention and rotary positions 0..seq-1, as the full model does.
    ``config`` is a plain attribute (AWQ reads head counts from it).
    """

    def __init__(self, layer: nn.Module, index: int, rotary: nn.Module, config) -> None:
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleDict({str(index): layer})
        self.index = index
        self.config = config
        # Not a submodule: its buffers must not appear in the block's state_dict.
        self._rotary = [rotary]
        self._positions: dict[tuple[int, torch.device], tuple[Tensor, tuple[Tensor, Tensor]]] = {}

    @property
    def layer(self) -> nn.Module:
        return self.model.layers[str(self.index)]

    @property
    def prefix(self) -> str:
        return f"model.layers.{self.index}."

    def _pos(self, x: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        key = (x.shape[1], x.device)
        if key not in self._positions:
            pos = torch.arange(x.shape[1], device=x.device).unsqueeze(0)
            self._positions[key] = (pos, self._rotary[0](x, position_ids=pos))
        return self._positions[key]

    def forward(self, hidden: Tensor) -> Tensor:
        from transformers import masking_utils

        ref = next(self.layer.parameters())
        x = hidden.to(device=ref.device, dtype=ref.dtype)
        pos, pe = self._pos(x)
        window = getattr(self.config, "sliding_window", None) if self.config.model_type == "mistral" else None
        mask_fn = masking_utils.create_causal_mask if window is None else masking_utils.create_sliding_window_causal_mask
        # positional: the embeddings argument is input_embeds in 4.x and inputs_embeds in 5.x
        mask = mask_fn(self.config, x, None, position_ids=pos, **_no_cache_kwargs(mask_fn, pos[0]))
        return self.layer(x, attention_mask=mask, position_ids=pos, position_embeddings=pe)


def _no_cache_kwargs(mask_fn: Callable, cache_position: Tensor) -> dict:
    """"No KV cache" in the mask builder's own words: transformers ≥ 5.24 calls it ``cache`` (and
    removes ``past_key_values`` in 5.40); 4.53–5.23 call it ``past_key_values``, and 4.x sizes the
    mask from ``cache_position: [seq]`` (the positions 0..seq-1 without a cache)."""
    params = inspect.signature(mask_fn).parameters
    kwargs: dict = {"cache": None} if "cache" in params else {"past_key_values": None}
    if "cache_position" in params:
        kwargs["cache_position"] = cache_position
    return kwargs


def block_linears(host: BlockHost, only: list[str] | None = None, skip: list[str] | None = None) -> dict[str, nn.Linear]:
    """The target Linears of one block by qualified name (same rule as models.target_linears)."""
    found = {}
    for name, mod in host.named_modules():
        if not is_target(name):
            continue
        if not isinstance(mod, nn.Linear):
            raise BadInput(f"{name} is a {type(mod).__name__}, not a Linear; eora-export handles plain Linear layers only")
        if selected(name, only, skip):
            found[name] = mod
    return found


@torch.no_grad()
def run_block(host: nn.Module, hidden: Tensor, batch_size: int, out_dtype: torch.dtype, what: str = "") -> Tensor:
    """``hidden: [n, seq, h]`` (CPU, any dtype) through ``host`` in batches -> ``[n, seq, h]``
    ``out_dtype`` on the CPU. Refuses outputs that overflow ``out_dtype``."""
    out = torch.empty(hidden.shape, dtype=out_dtype)
    for i in range(0, hidden.shape[0], batch_size):
        y = host(hidden[i : i + batch_size])
        out[i : i + batch_size] = y.to(device="cpu", dtype=out_dtype)
    if not torch.isfinite(out).all():
        hint = " rerun with float32 activations (--stream-act-dtype float32)" if out_dtype != torch.float32 else " check the model weights"
        raise BadInput(f"NaN/Inf in the activations after {what or 'a block'};{hint}")
    return out


class _HookTimer:
    """Seconds spent in the GramCollector's hooks: pre-hooks registered before and after
    its own (hooks run in registration order) bracket exactly the Gram accumulation."""

    def __init__(self, modules: Iterable[nn.Module], sync: Callable[[], None]) -> None:
        self.seconds = 0.0
        self._t0 = 0.0
        self._modules = list(modules)
        self._sync = sync
        self._handles: list = []

    def start_hooks(self) -> None:
        for m in self._modules:
            self._handles.append(m.register_forward_pre_hook(self._start, prepend=True))

    def stop_hooks(self) -> None:
        for m in self._modules:
            self._handles.append(m.register_forward_pre_hook(self._stop))

    def _start(self, _m: nn.Module, _a: tuple) -> None:
        self._sync()
        self._t0 = time.perf_counter()

    def _stop(self, _m: nn.Module, _a: tuple) -> None:
        self._sync()
        self.seconds += time.perf_counter() - self._t0

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


@torch.no_grad()
def gram_forward(
    host: BlockHost,
    linears: dict[str, nn.Linear],
    hidden: Tensor,
    batch_size: int,
    keep_outputs: bool,
    out_dtype: torch.dtype,
    sync: Callable[[], None] = lambda: None,
) -> tuple[GramStore, Tensor | None, float]:
    """Grams of ``linears`` from ``hidden: [n, seq, h]`` through the block; also the
    block's outputs ``[n, seq, h]`` when ``keep_outputs``. Returns (grams, outputs, seconds
    spent accumulating Grams)."""
    out = torch.empty(hidden.shape, dtype=out_dtype) if keep_outputs else None
    timer = _HookTimer(linears.values(), sync)
    timer.start_hooks()
    try:
        with GramCollector(linears) as col:
            timer.stop_hooks()
            for i in range(0, hidden.shape[0], batch_size):
                y = host(hidden[i : i + batch_size])
                col.end_batch()
                if out is not None:
                    out[i : i + batch_size] = y.to(device="cpu", dtype=out_dtype)
    finally:
        timer.remove()
    if out is not None and not torch.isfinite(out).all():
        raise BadInput(f"NaN/Inf in the activations after block {host.index}; rerun with float32 activations (--stream-act-dtype float32)")
    return col.store, out, timer.seconds
