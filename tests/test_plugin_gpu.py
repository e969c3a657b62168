"""The EoraLinear CUDA kernel against the PyTorch reference, on a GPU, through ctypes.

Every path (GEMV, tensor core, 2:4 GEMV, simple), weight INT4 / 2:4+INT4 / FP16, ranks 0-256 and
INT4 / INT8 / FP16 factors, for M from 1 to 1000, is compared with
:meth:`eora_export.eora_linear.EoraLinear.forward` on the same GPU. Skipped without CUDA.

Shapes are small (K=1024, N=200: two column tiles, the second partial) so the whole file runs in
well under a minute on an H100 once the library is built.
"""

from __future__ import annotations

import functools

import pytest
import torch

from eora_export.deploy import plugin as tp
from eora_export.eora_linear import EoraLinear
from eora_export.quant import quantize

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU (torch.cuda.is_available() is False)"),
]

K, N, GROUP, LGROUP = 1024, 200, 64, 16
MS = (1, 2, 3, 8, 16, 33, 64, 128, 256, 1000)
RANKS = (0, 16, 64, 128, 256)


@pytest.fixture(scope="module")
def lib():
    if tp.find_library() is None:
        try:
            tp.build_plugin()
        except tp.PluginError as e:
            pytest.fail(f"cannot build the plugin library: {e}")
    return tp.load_plugin()


def prune_24(w: torch.Tensor) -> torch.Tensor:
    """Keep the 2 largest of every 4 consecutive inputs (torch layout [out, in]: along in = K)."""
    g = w.reshape(w.shape[0], -1, 4)
    idx = g.abs().topk(2, dim=-1).indices
    mask = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, idx, True)
    return (g * mask).reshape_as(w)


@functools.cache
def make_layer(weight: str, rank: int, lbits: int, bias: bool = True, k: int = K, n: int = N,
               wbits: int = 4, seed: int = 0, lgroup: int = LGROUP) -> EoraLinear:
    g = torch.Generator().manual_seed(seed * 1000 + rank * 10 + lbits)
    w = torch.randn(n, k, generator=g) * 0.05
    if weight == "sparse24":
        w = prune_24(w)
    wq = quantize(w, 16, 0) if weight == "fp16" else quantize(w, wbits, GROUP if k % GROUP == 0 else 2)
    a = b = None
    if rank:
        # Large enough factors that dropping the residual would fail the comparison by a wide margin.
        lg = 0 if lbits == 16 else lgroup
        a = quantize(torch.randn(rank, k, generator=g) * 0.05, lbits, lg)
        b = quantize(torch.randn(n, rank, generator=g) * 0.3, lbits, lg)
    bvec = torch.randn(n, generator=g) * 0.1 if bias else None
    return EoraLinear(wq, a, b, bvec, sparse24=weight == "sparse24")


@functools.cache
def device_inputs(layer: EoraLinear) -> tuple[dict, dict, EoraLinear]:
    tensors, attrs = tp.plugin_inputs(layer, "cuda")
    return tensors, attrs, layer.to("cuda")


def check_close(y: torch.Tensor, ref: torch.Tensor, what: str, base: torch.Tensor | None = None) -> None:
    y32, r32 = y.float(), ref.float()
    assert torch.isfinite(y32).all(), f"{what}: non-finite output"
    scale = r32.abs().max().item()
    tol = 2e-3 * scale + 1e-3
    err = (y32 - r32).abs().max().item()
    assert err <= tol, f"{what}: max error {err:.3g} > {tol:.3g} (output scale {scale:.3g})"
    if base is not None:  # the residual must matter, or this comparison could not catch its loss
        assert (r32 - base.float()).abs().max().item() > 10 * tol, f"{what}: residual too small to test"


def run_case(lib, weight: str, rank: int, lbits: int, m: int, algo: int | str = 0) -> None:
    layer = make_layer(weight, rank, lbits)
    tensors, attrs, ref_layer = device_inputs(layer)
    torch.manual_seed(m)
    x = torch.randn(m, K, device="cuda").half()
    y = tp.eora_linear_cuda(x, tensors, attrs, algo=algo)
    ref = ref_layer(x)
    base = None
    if rank and m >= 8:
        base = (x.float() @ ref_layer.weight.float().T + ref_layer.bias.float()).half()
    path = algo if isinstance(algo, str) else tp.select_path(attrs, m, algo)
    check_close(y, ref, f"{weight} r={rank} lb={lbits} M={m} path={path}", base)


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("rank,lbits", [(0, 16)] + [(r, b) for r in RANKS[1:] for b in (4, 8, 16)])
@pytest.mark.parametrize("weight", ["int4", "sparse24", "fp16"])
def test_kernel_matches_reference(lib, weight, rank, lbits, m):
    run_case(lib, weight, rank, lbits, m)


@pytest.mark.parametrize("algo", ["gemv", "tensor_core", "simple"])
@pytest.mark.parametrize("m", (1, 5, 16, 33))
@pytest.mark.parametrize("weight", ["int4", "sparse24", "fp16"])
def test_every_path_matches_reference(lib, weight, algo, m):
    """Force each path, including GEMV beyond 8 rows (several M chunks) and tensor cores at M=1."""
    run_case(lib, weight, 64, 4, m, algo)


def test_deterministic_split_k(lib):
    """Split-K partials meet in a fixed order: two runs give identical bits."""
    tensors, attrs, _ = device_inputs(make_layer("int4", 128, 4))
    x = torch.randn(4, K, device="cuda").half()
    y1 = tp.eora_linear_cuda(x, tensors, attrs)
    y2 = tp.eora_linear_cuda(x, tensors, attrs)
    assert torch.equal(y1, y2)


def test_three_bit_weight_and_no_bias(lib):
    layer = make_layer("int4", 16, 4, bias=False, wbits=3)
    tensors, attrs, ref_layer = device_inputs(layer)
    assert attrs["weight_bits"] == 3 and attrs["has_bias"] == 0
    for m in (1, 40):
        x = torch.randn(m, K, device="cuda").half()
        check_close(tp.eora_linear_cuda(x, tensors, attrs), ref_layer(x), f"3-bit M={m}")


def test_shapes_outside_the_fast_paths(lib):
    """N not a multiple of 8, K not a multiple of 8: the simple kernel takes them."""
    layer = make_layer("int4", 6, 8, k=66, n=34)
    tensors, attrs, ref_layer = device_inputs(layer)
    assert tp.select_path(attrs, 4) == "simple"
    x = torch.randn(3, 5, 66, device="cuda").half()  # leading dims flatten to M = 15
    y = tp.eora_linear_cuda(x, tensors, attrs)
    assert y.shape == (3, 5, 34)
    check_close(y, ref_layer(x), "odd shape")


def test_sparse_flag_falls_back_to_dense(lib):
    """A weight declared 2:4 that is not: the compaction flags it and the GEMV uses the dense weight."""
    layer = make_layer("int4", 16, 4)
    tensors, attrs, ref_layer = device_inputs(layer)
    attrs = {**attrs, "sparse24": 1}
    x = torch.randn(2, K, device="cuda").half()
    check_close(tp.eora_linear_cuda(x, tensors, attrs), ref_layer(x), "non-2:4 weight with sparse24=1")


def test_m_zero_and_large_leading_dims(lib):
    tensors, attrs, ref_layer = device_inputs(make_layer("int4", 16, 4))
    assert tp.eora_linear_cuda(torch.empty(0, K, device="cuda").half(), tensors, attrs).shape == (0, N)
    x = torch.randn(2, 600, K, device="cuda").half()
    check_close(tp.eora_linear_cuda(x, tensors, attrs), ref_layer(x), "M=1200 via leading dims")


# --------------------------------------------------------------------------- the M <= 16 skinny path (packed copies)

SK_K, SK_N = 1024, 320  # 5 strips of 64 columns; groups of 64 along K and along the rank


@pytest.mark.parametrize("m", (1, 2, 5, 8, 9, 16))
@pytest.mark.parametrize("rank,wbits", [(0, 4), (64, 4), (128, 4), (128, 3)])
def test_skinny_path_matches_reference(lib, rank, wbits, m):
    layer = make_layer("int4", rank, 4 if rank else 16, k=SK_K, n=SK_N, wbits=wbits, lgroup=64)
    tensors, attrs, ref_layer = device_inputs(layer)
    assert tp.select_path(attrs, m) == "skinny" and tp.packed_bytes(attrs) > 0
    torch.manual_seed(m)
    x = torch.randn(m, SK_K, device="cuda").half()
    packed = tp.prepare_packed(tensors, attrs)
    y = tp.eora_linear_cuda(x, tensors, attrs, packed=packed)
    base = (x.float() @ ref_layer.weight.float().T + ref_layer.bias.float()).half() if rank and m >= 8 else None
    check_close(y, ref_layer(x), f"skinny r={rank} wbits={wbits} M={m}", base)
    # The same call without the packed copies runs the GEMV: both paths agree with the reference.
    y_gemv = tp.eora_linear_cuda(x, tensors, attrs, packed="none")
    check_close(y_gemv, ref_layer(x), f"gemv r={rank} M={m}")


def test_skinny_split_k_is_deterministic_and_llama_shaped(lib):
    """A Llama-2-7B MLP shape (K=4096, N=11008, rank 128): many splits, and two runs give identical bits."""
    layer = make_layer("int4", 128, 4, k=4096, n=11008, lgroup=64)
    tensors, attrs, ref_layer = device_inputs(layer)
    packed = tp.prepare_packed(tensors, attrs)
    for m in (1, 16):
        x = torch.randn(m, 4096, device="cuda").half()
        y1 = tp.eora_linear_cuda(x, tensors, attrs, packed=packed)
        y2 = tp.eora_linear_cuda(x, tensors, attrs, packed=packed)
        assert torch.equal(y1, y2)
        check_close(y1, ref_layer(x), f"skinny llama M={m}")


def test_skinny_in_a_cuda_graph(lib):
    """Captured into a CUDA graph and replayed (how the benchmark and TensorRT run it)."""
    layer = make_layer("int4", 128, 4, k=SK_K, n=SK_N, lgroup=64)
    tensors, attrs, ref_layer = device_inputs(layer)
    packed = tp.prepare_packed(tensors, attrs)
    x = torch.randn(1, SK_K, device="cuda").half()
    y = torch.empty(1, SK_N, device="cuda", dtype=torch.float16)
    tp.eora_linear_cuda(x, tensors, attrs, packed=packed, out=y)  # warm-up: workspace and counters exist
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        tp.eora_linear_cuda(x, tensors, attrs, packed=packed, out=y)
    x.copy_(torch.randn(1, SK_K, device="cuda").half())
    g.replay()
    torch.cuda.synchronize()
    check_close(y, ref_layer(x), "skinny in a CUDA graph")


@pytest.mark.parametrize("m", (1, 8, 16))
def test_skinny_path_reads_a_24_weight_dense(lib, m):
    """sparse24=1 at M <= 16 takes the skinny path on the dense weight (the compacted GEMV is ALU-bound)."""
    layer = make_layer("sparse24", 128, 4, k=SK_K, n=SK_N, lgroup=64)
    tensors, attrs, ref_layer = device_inputs(layer)
    assert attrs["sparse24"] == 1 and tp.select_path(attrs, m) == "skinny"
    assert tp.select_path(attrs, m, packed=False) == "gemv"
    x = torch.randn(m, SK_K, device="cuda").half()
    check_close(tp.eora_linear_cuda(x, tensors, attrs), ref_layer(x), f"2:4 skinny M={m}")
    check_close(tp.eora_linear_cuda(x, tensors, attrs, packed="none"), ref_layer(x), f"2:4 compacted GEMV M={m}")


# --------------------------------------------------------------------------- the opt-in CUTLASS path (M > 16, sm_90a)


@pytest.mark.parametrize("m", (17, 64, 256, 1000))
@pytest.mark.parametrize("rank", (0, 128))
def test_cutlass_path_matches_reference(lib, rank, m):
    layer = make_layer("int4", rank, 4 if rank else 16, k=SK_K, n=SK_N, lgroup=64)
    tensors, attrs, ref_layer = device_inputs(layer)
    if tp.cutlass_bytes(attrs) == 0:
        pytest.skip("library built without the CUTLASS path (needs nvidia-cutlass at build time and sm_90a)")
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the CUTLASS path is compiled for sm_90a only")
    x = torch.randn(m, SK_K, device="cuda").half()
    y = tp.eora_linear_cuda(x, tensors, attrs, algo="cutlass")
    base = (x.float() @ ref_layer.weight.float().T + ref_layer.bias.float()).half() if rank else None
    check_close(y, ref_layer(x), f"cutlass r={rank} M={m}", base)
