"""The statistics error feedback fits on: forward pre-hooks that see one calibration batch in the
FP model and in the compressed one, and accumulate over the same tokens the Grams G_fp, C and
G_c of a shared input, and (for a Linear that adds to the residual stream) that stream's error
against them (:class:`Residual`). The math that uses them is in :mod:`.feedback`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Residual:
    """The residual stream's error E = R_fp − R_c [out, N] at one Linear's output, against its
    inputs over the same tokens: ``cross_c`` = E X_cᵀ / N and ``cross_fp`` = E X_fpᵀ / N [out, in]
    float64, ``sq`` = ‖E‖² / N."""

    cross_c: Tensor
    cross_fp: Tensor
    sq: float


class _StopForward(Exception):
    """Raised by a hook once the inputs of the group being fitted are seen (the rest of the
    forward cannot change them)."""


class PairedInputs:
    """Forward pre-hooks that accumulate G_fp, C = X_fp X_cᵀ and G_c over the same tokens.

    ``fp_mods`` / ``c_mods``: one module per shared-input key (any Linear reading it), in the
    FP and in the compressed model. Per batch run the FP forward first (it stores X_fp), then
    the compressed one on the same ids (it accumulates). ``stop``: abort each forward once
    every key has been seen in it, so a walk over a deep model does not pay full forwards.
    ``residuals``: key -> (FP module, compressed module) whose input is the residual stream the
    key's Linears add to, called before them (the norm that opens their sublayer); for those keys
    E = R_fp − R_c is accumulated against X_fp and X_c (:class:`Residual`).
    """

    def __init__(self, fp_mods: dict[str, torch.nn.Module], c_mods: dict[str, torch.nn.Module], stop: bool = True,
                 residuals: dict[str, tuple[torch.nn.Module, torch.nn.Module]] | None = None) -> None:
        self.keys = list(fp_mods)
        self.fp_mods, self.c_mods, self.stop = fp_mods, c_mods, stop
        self.residuals = residuals or {}
        self.resid_c: dict[str, Tensor] = {}
        self.resid_fp: dict[str, Tensor] = {}
        self.resid_sq = {k: 0.0 for k in self.residuals}
        self._r: dict[tuple[str, str], Tensor] = {}
        n = {k: m.in_features if hasattr(m, "in_features") else m.weight.shape[1] for k, m in fp_mods.items()}
        self.gram_fp = {k: torch.zeros(n[k], n[k], dtype=torch.float64) for k in self.keys}
        self.cross = {k: torch.zeros(n[k], n[k], dtype=torch.float64) for k in self.keys}
        self.gram_c = {k: torch.zeros(n[k], n[k], dtype=torch.float64) for k in self.keys}
        self.tokens = 0
        self._x_fp: dict[str, Tensor] = {}
        self._seen: set[str] = set()

    def _hook(self, key: str, side: str):
        def hook(_m: torch.nn.Module, args: tuple) -> None:
            flat = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float64)
            if side == "fp":
                self._x_fp[key] = flat
                self.gram_fp[key].addmm_(flat.T, flat)
            else:
                x_fp = self._x_fp.pop(key)
                if x_fp.shape != flat.shape:
                    raise RuntimeError(f"feedback: FP and compressed inputs of {key} differ in shape")
                self.cross[key].addmm_(x_fp.T, flat)
                self.gram_c[key].addmm_(flat.T, flat)
                if key in self.residuals:
                    self._add_residual(key, x_fp, flat)
            self._seen.add(key)
            if self.stop and len(self._seen) == len(self.keys):
                raise _StopForward

        return hook

    def _residual_hook(self, key: str, side: str):
        def hook(_m: torch.nn.Module, args: tuple) -> None:
            self._r[key, side] = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float64)

        return hook

    def _add_residual(self, key: str, x_fp: Tensor, x_c: Tensor) -> None:
        try:
            err = self._r.pop((key, "fp")) - self._r.pop((key, "c"))  # E [N, out]
        except KeyError:
            raise RuntimeError(f"feedback: the residual stream of {key} was not seen before it") from None
        if err.shape[0] != x_c.shape[0]:
            raise RuntimeError(f"feedback: the residual stream of {key} has {err.shape[0]} tokens, its input {x_c.shape[0]}")
        if key not in self.resid_c:
            self.resid_c[key] = torch.zeros(err.shape[1], x_c.shape[1], dtype=torch.float64)
            self.resid_fp[key] = torch.zeros_like(self.resid_c[key])
        self.resid_c[key].addmm_(err.T, x_c)
        self.resid_fp[key].addmm_(err.T, x_fp)
        self.resid_sq[key] += float(err.square().sum())

    def run(self, forward_fp, forward_c, batches) -> None:
        """``forward_fp(batch)``, ``forward_c(batch)`` for every batch, hooks attached."""
        handles = [m.register_forward_pre_hook(self._hook(k, "fp")) for k, m in self.fp_mods.items()]
        handles += [m.register_forward_pre_hook(self._hook(k, "c")) for k, m in self.c_mods.items()]
        for k, (fp_m, c_m) in self.residuals.items():
            handles += [fp_m.register_forward_pre_hook(self._residual_hook(k, "fp")),
                        c_m.register_forward_pre_hook(self._residual_hook(k, "c"))]
        try:
            for batch in batches:
                for fwd in (forward_fp, forward_c):
                    self._seen.clear()
                    try:
                        fwd(batch)
                    except _StopForward:
                        pass
                self.tokens += _batch_tokens(batch)
        finally:
            for h in handles:
                h.remove()
            self._x_fp.clear()
            self._r.clear()

    def grams(self, key: str) -> tuple[Tensor, Tensor, Tensor]:
        """(G_fp, C, G_c) per token for one key, [in, in] float64."""
        n = max(self.tokens, 1)
        return self.gram_fp[key] / n, self.cross[key] / n, self.gram_c[key] / n

    def residual(self, key: str) -> Residual | None:
        """E X_cᵀ / N, E X_fpᵀ / N and ‖E‖² / N for a key with a residual stream, else None."""
        if key not in self.resid_c:
            return None
        n = max(self.tokens, 1)
        return Residual(self.resid_c[key] / n, self.resid_fp[key] / n, self.resid_sq[key] / n)


def _batch_tokens(batch: Tensor) -> int:
    return int(batch.shape[0] * batch.shape[1]) if batch.ndim >= 2 else int(batch.numel())


@torch.no_grad()
def shared_inputs(
    unit: list[str], fp_modules: dict[str, torch.nn.Module], forward_fp: Callable[[Tensor], object], batch: Tensor
) -> dict[str, list[str]]:
    """Group ``unit``'s Linears by the tensor they read (one FP forward of ``batch``)."""
    seen: dict[int, tuple[Tensor, str]] = {}
    owner: dict[str, str] = {}

    def hook_for(name: str):
        def hook(_m: torch.nn.Module, args: tuple) -> None:
            x = args[0]
            hit = seen.get(id(x))
            owner[name] = hit[1] if hit is not None and hit[0] is x else name
            if hit is None:
                seen[id(x)] = (x, name)
            if len(owner) == len(unit):
                raise _StopForward

        return hook

    handles = [fp_modules[n].register_forward_pre_hook(hook_for(n)) for n in unit]
    try:
        forward_fp(batch)
    except _StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in unit if n not in owner]
    if missing:
        raise RuntimeError(f"feedback: {missing[0]} was not called by the forward")
    groups: dict[str, list[str]] = {}
    for name in unit:
        groups.setdefault(owner[name], []).append(name)
    return groups
