"""2:4 semi-structured sparsity along the input dimension: magnitude, SparseGPT, and NVIDIA ModelOpt.

2:4 here means: in every row of W ``[out, in]``, of every 4 consecutive inputs
(columns 4k .. 4k+3) at most 2 weights are non-zero, the layout sparse tensor cores read.

* ``magnitude_24``: keep the 2 largest |w| of each quad; the kept weights are unchanged.
* ``sparsegpt_24`` (ours): the OBS loop of :mod:`.gptq` with float16 rounding, choosing
  each quad's mask from w² / U_jj² on the already-updated weights and pushing the
  pruning error onto the weights not yet visited (Frantar & Alistarh, arXiv 2301.00774).
* ``modelopt_masks``: ModelOpt's ``mts.sparsify(model, "sparsegpt", …)`` on a deep copy
  of the model; only its masks are read back, the copy is dropped, so the caller's model
  stays a plain HF model. ModelOpt 0.47's SparseGPT uses the OBS update only to choose
  the mask and then returns ``W ⊙ mask`` (``create_sgpt_mask`` returns ``weight != 0``
  and ``SparseModule`` multiplies the *original* weight by it), so :func:`refit_24`
  re-runs the OBS update with that mask fixed to get the reconstructed kept weights.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import warnings
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from .gptq import DEFAULT_DAMP, obs_compress
from .threads import single_thread

log = logging.getLogger(__name__)

SPARSEGPT_BACKENDS = ("auto", "modelopt", "own")
# "auto" runs ModelOpt on a deep copy of the model only while that copy is small.
MODELOPT_MAX_COPY_BYTES = 2 << 30


def is_24(w: Tensor) -> bool:
    """True when every 4 consecutive inputs of every row hold at most 2 non-zeros."""
    rows, cols = w.shape
    if cols % 4:
        return False
    return bool(((w != 0).reshape(rows, cols // 4, 4).sum(-1) <= 2).all())


def magnitude_24(w: Tensor) -> tuple[Tensor, Tensor]:
    """(float32 W ⊙ mask, bool mask): the 2 largest |w| of every 4 consecutive inputs kept."""
    rows, cols = w.shape
    w = w.detach().float()
    with single_thread():
        quads = w.abs().reshape(rows, cols // 4, 4)
        top = quads.topk(2, dim=-1).indices
        keep = torch.zeros_like(quads, dtype=torch.bool).scatter_(-1, top, True).reshape(rows, cols)
        return w * keep, keep


def sparsegpt_24(w: Tensor, gram: Tensor, damp: float = DEFAULT_DAMP, name: str = "layer") -> tuple[Tensor, Tensor]:
    """(float32 fp16-exact sparse W, bool mask) by our own SparseGPT with 2:4 mask selection."""
    res = obs_compress(w, gram, bits=16, select_24=True, damp=damp, name=name)
    return res.values, res.keep


def refit_24(w: Tensor, gram: Tensor, keep: Tensor, damp: float = DEFAULT_DAMP, name: str = "layer") -> Tensor:
    """float32 sparse W for a fixed mask: pruned weights 0, their OBS error pushed onto the kept ones."""
    return obs_compress(w, gram, bits=16, keep=keep, damp=damp, name=name).values


@torch.no_grad()
def modelopt_masks(
    model: nn.Module,
    names: Iterable[str],
    calib_windows: Tensor,
    batch_size: int = 8,
    damp: float = DEFAULT_DAMP,
) -> dict[str, Tensor]:
    """name -> bool 2:4 mask ``[out, in]`` from ModelOpt SparseGPT, run on a deep copy of ``model``.

    ``damp`` replaces ModelOpt's default 10% damping by ours (1%, as in the SparseGPT paper):
    with 10% the masks it picks give a clearly larger output error after the refit.

    Raises ImportError when ModelOpt is missing, RuntimeError when it returns no usable mask.
    """
    names = list(names)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import modelopt.torch.sparsity as mts
    work = copy.deepcopy(model).eval()
    rules = {"nn.Linear": {"*": None, **{n: {} for n in names}}}
    batches = [calib_windows[i : i + batch_size] for i in range(0, calib_windows.shape[0], batch_size)]
    config = {"data_loader": batches, "collect_func": lambda b: b, "verbose": False, "hessian_damp": damp}
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        mts.sparsify(work, [("sparsegpt", rules)], config=config)
    masks: dict[str, Tensor] = {}
    for n in names:
        mod = work.get_submodule(n)
        mask = getattr(mod, "_weight_mask", None)
        if mask is None:
            raise RuntimeError(f"ModelOpt left {n} dense (no 2:4 mask)")
        mask = mask.detach().to(torch.bool).cpu().clone()
        if not is_24(mask.to(torch.int8)):
            raise RuntimeError(f"ModelOpt's mask for {n} is not 2:4 along the input dimension")
        masks[n] = mask
    del work
    return masks


def _model_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def sparsegpt(
    model: nn.Module, names: list[str], ref: dict[str, Tensor], grams, windows: Tensor, backend: str
) -> tuple[dict[str, Tensor], dict[str, Tensor], str]:
    """(sparse weights, masks, which implementation ran): ModelOpt's masks refit by our OBS update,
    or our own SparseGPT ("auto": ModelOpt while the model copy is small, ours on any ModelOpt failure)."""
    masks = None
    if backend == "auto" and _model_bytes(model) > MODELOPT_MAX_COPY_BYTES:
        log.info("SparseGPT: model too large for a ModelOpt deep copy; using our own SparseGPT")
    elif backend in ("auto", "modelopt"):
        try:
            device = next(model.parameters()).device
            masks = modelopt_masks(model, names, windows.to(device))
        except Exception as e:  # any ModelOpt failure means: use ours
            if backend == "modelopt":
                raise
            warnings.warn(
                f"ModelOpt SparseGPT unavailable ({type(e).__name__}: {e}); using our own SparseGPT", stacklevel=4
            )
    work, keep = {}, {}
    if masks is not None:
        for n in names:
            work[n] = refit_24(ref[n], grams.gram(n), masks[n], name=n)
            keep[n] = masks[n]
        how = "sparsegpt[modelopt-mask+obs-refit]"
    else:
        for n in names:
            work[n], keep[n] = sparsegpt_24(ref[n], grams.gram(n), name=n)
        how = "sparsegpt[own]"
    log.info("2:4 sparsity by %s", how)
    return work, keep, how


def magnitude(model: nn.Module, names: list[str], ref: dict[str, Tensor], grams, windows: Tensor, backend: str):
    """(sparse weights, masks, what ran) by :func:`magnitude_24`; the other arguments are the registry's signature."""
    work, keep = {}, {}
    for n in names:
        work[n], keep[n] = magnitude_24(ref[n])
    return work, keep, "magnitude 2:4"

