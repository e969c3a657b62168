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
import warnings
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from .gptq import DEFAULT_DAMP, obs_compress, single_thread


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
