"""Error-feedback EoRA: the closed form is optimal, reduces to EoRA, and the walk feeds errors forward."""

import pytest
import torch
from torch import nn

from eora_export.calibration import collect_grams
from eora_export.compensate.apply import CompensationConfig, compensate_layers
from eora_export.compensate.eora import eora_factors, weighted_error
from eora_export.compensate.feedback import feedback_error, feedback_factors, feedback_target, feedback_walk, walk_units
from eora_export.compress import CompressConfig, compress_model
from eora_export.eora_linear import EoraLinear
from eora_export.models import set_module

F64 = torch.float64


def _case(n: int, d_in: int = 32, d_out: int = 24, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d_out, d_in, generator=g, dtype=F64)
    w_c = w + 0.2 * torch.randn(d_out, d_in, generator=g, dtype=F64)
    x_fp = torch.randn(d_in, n, generator=g, dtype=F64) * torch.logspace(0, -2, d_in, dtype=F64)[:, None]
    # The compressed upstream distorts the inputs: a linear drift plus noise.
    x_c = x_fp + 0.1 * torch.randn(d_in, d_in, generator=g, dtype=F64) @ x_fp + 0.02 * torch.randn(d_in, n, generator=g, dtype=F64)
    return w, w_c, x_fp, x_c


def _grams(x_fp, x_c):
    n = x_fp.shape[1]
    return x_fp @ x_fp.T / n, x_fp @ x_c.T / n, x_c @ x_c.T / n


def _objective(w, w_c, x_fp, x_c, m):
    return float(((w @ x_fp - (w_c + m) @ x_c) ** 2).sum() / x_fp.shape[1])


@pytest.mark.parametrize("n", [2000, 20], ids=["full-rank", "rank-deficient"])
def test_closed_form_is_optimal_against_random_rank_r_candidates(n):
    w, w_c, x_fp, x_c = _case(n)
    rank = 4
    b, a, t = feedback_factors(w, w_c, *_grams(x_fp, x_c), rank)
    assert torch.isfinite(b).all() and torch.isfinite(a).all()
    best = _objective(w, w_c, x_fp, x_c, b @ a)
    # The cheap metrics equal the objective computed from the data.
    assert t.before == pytest.approx(_objective(w, w_c, x_fp, x_c, 0 * w), rel=1e-9)
    assert feedback_error(t, b, a) == pytest.approx(best, rel=1e-9, abs=1e-12)
    assert best < t.before
    g = torch.Generator().manual_seed(7)
    for _ in range(50):
        cb = torch.randn(*b.shape, generator=g, dtype=F64)
        ca = torch.randn(*a.shape, generator=g, dtype=F64) * 0.1
        assert _objective(w, w_c, x_fp, x_c, cb @ ca) >= best
        eps = 1e-3  # rank-r perturbations of the optimum do not improve it
        assert _objective(w, w_c, x_fp, x_c, (b + eps * cb) @ (a + eps * ca)) >= best - 1e-9 * best


def test_feedback_beats_plain_eora_on_its_objective():
    w, w_c, x_fp, x_c = _case(2000)
    grams = _grams(x_fp, x_c)
    b, a, _ = feedback_factors(w, w_c, *grams, 4)
    be, ae = eora_factors(w - w_c, grams[0], 4)
    assert _objective(w, w_c, x_fp, x_c, b @ a) < _objective(w, w_c, x_fp, x_c, be @ ae)


def test_reduces_to_plain_eora_when_inputs_agree():
    w, w_c, x_fp, _ = _case(2000)
    grams = _grams(x_fp, x_fp)
    b, a, t = feedback_factors(w, w_c, *grams, 6)
    be, ae = eora_factors(w - w_c, grams[0], 6)
    assert torch.allclose(b @ a, be @ ae, atol=1e-10)
    assert feedback_error(t, b, a) == pytest.approx(weighted_error(w - w_c, grams[0], be, ae), rel=1e-9)


def test_shrink_one_is_plain_eora_in_the_compressed_metric():
    w, w_c, x_fp, x_c = _case(2000)
    gram_fp, cross, gram_c = _grams(x_fp, x_c)
    t = feedback_target(w, w_c, gram_fp, cross, gram_c, shrink=1.0)
    b, a, _ = feedback_factors(w, w_c, gram_fp, cross, gram_c, 5, shrink=1.0)
    be, ae = eora_factors(w - w_c, gram_c, 5)
    assert torch.allclose(b @ a, be @ ae, atol=1e-10)
    assert t.floor <= feedback_error(t, b, a)
    with pytest.raises(ValueError, match="shrink"):
        feedback_target(w, w_c, gram_fp, cross, gram_c, shrink=1.5)


class _Toy(nn.Module):
    """Two blocks of (shared-input pair, then one Linear): enough for units and shared inputs. Each
    block opens with a module reading the residual stream (an identity ``norm``, as Llama's norms do)."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.layers = nn.ModuleList()
        for _ in range(2):
            blk = nn.Module()
            blk.up = nn.Linear(32, 64, bias=False)
            blk.gate = nn.Linear(32, 64, bias=False)
            blk.down = nn.Linear(64, 32, bias=False)
            for lin in (blk.up, blk.gate, blk.down):
                lin.weight.data = torch.randn(lin.weight.shape, generator=g) / lin.in_features**0.5
            blk.norm = nn.Identity()
            self.layers.append(blk)

    def forward(self, x):
        for blk in self.layers:
            h = blk.norm(x)
            x = x + blk.down(torch.nn.functional.silu(blk.gate(h)) * blk.up(h))
        return x


def _toy_case(seed: int, windows: int):
    """An FP toy, its 3-bit RTN copy, the FP Linears, calibration [windows, 16, 32], its Grams, the compressed layers."""
    torch.manual_seed(seed)
    fp = _Toy().eval()
    c = _Toy().eval()
    c.load_state_dict(fp.state_dict())
    lin = {n: m for n, m in fp.named_modules() if isinstance(m, nn.Linear)}
    calib = torch.randn(windows, 16, 32)
    grams = collect_grams(fp, lin, calib, 8, False)
    compressed = compress_model(c, {n: c.get_submodule(n) for n in lin}, grams, CompressConfig(quant="rtn", bits=3, group_size=32), calib)
    return fp, c, lin, calib, grams, compressed


def test_walk_first_unit_is_plain_eora_and_later_units_use_feedback():
    fp, c, lin, calib, grams, compressed = _toy_case(0, 64)
    assert grams.owner["layers.0.gate"] == grams.owner["layers.0.up"]
    cfg = CompensationConfig(rank=4, lowrank_bits=16)
    units = walk_units(list(compressed), "input", grams.owner)
    assert units == [["layers.0.up", "layers.0.gate"], ["layers.0.down"], ["layers.1.up", "layers.1.gate"], ["layers.1.down"]]
    assert walk_units(list(compressed), "block", grams.owner) == [units[0] + units[1], units[2] + units[3]]
    for n, cl in compressed.items():
        set_module(c, n, EoraLinear(cl.weight, sparse24=cl.sparse24))
    batches = lambda: [calib[i : i + 8] for i in range(0, 64, 8)]  # noqa: E731
    res = feedback_walk(units, compressed, lin, c.get_submodule, lambda n, m: set_module(c, n, m), fp, c, batches, cfg, damp=0.0)
    plain = compensate_layers(compressed, grams, CompensationConfig(method="eora", rank=4, lowrank_bits=16), progress=False)
    # The first unit sees exactly the FP inputs: plain EoRA.
    for n in units[0]:
        assert torch.allclose(res[n].module.residual_weight(), plain[n].module.residual_weight(), atol=1e-5)
    for n, r in res.items():
        assert r.error_after < r.error_before
        assert isinstance(c.get_submodule(n), EoraLinear) and c.get_submodule(n).rank == 4
    # End to end on the calibration data, feedback lands closer to the FP outputs than plain EoRA.
    with torch.no_grad():
        ref = fp(calib)
        fb_err = float(((c(calib) - ref) ** 2).mean())
        for n, r in plain.items():
            set_module(c, n, r.module)
        eora_err = float(((c(calib) - ref) ** 2).mean())
    assert fb_err < eora_err


def test_walk_takes_per_layer_ranks_and_damping_keeps_factors_tame():
    fp, c, lin, calib, grams, compressed = _toy_case(1, 32)
    for n, cl in compressed.items():
        set_module(c, n, EoraLinear(cl.weight, sparse24=cl.sparse24))
    ranks = dict.fromkeys(compressed, 8) | {"layers.0.down": 0, "layers.1.up": 16}
    batches = lambda: [calib[i : i + 8] for i in range(0, 32, 8)]  # noqa: E731
    res = feedback_walk(walk_units(list(compressed), "input", grams.owner), compressed, lin, c.get_submodule,
                        lambda n, m: set_module(c, n, m), fp, c, batches, CompensationConfig(rank=4, lowrank_bits=16), ranks=ranks)
    assert {n: r.rank for n, r in res.items()} == ranks
    assert res["layers.0.down"].module.rank == 0 and res["layers.0.down"].error_after == res["layers.0.down"].error_before


def test_damping_is_a_ridge_that_shrinks_the_regression():
    """δ > 0 minimises f(M) + δ‖M‖²: the factors shrink and the undamped objective rises only a little."""
    w, w_c, x_fp, x_c = _case(60, d_in=32)
    x_c[-4:] *= 1e-4  # directions the compressed inputs barely excite: the raw regression blows up there
    grams = _grams(x_fp, x_c)
    b0, a0, t0 = feedback_factors(w, w_c, *grams, 4)
    b1, a1, t1 = feedback_factors(w, w_c, *grams, 4, damp=0.01)
    assert float((b1 @ a1).norm()) < float((b0 @ a0).norm())
    assert feedback_error(t0, b0, a0) <= feedback_error(t0, b1, a1) < t0.before
    assert feedback_error(t1, b1, a1) == pytest.approx(_objective(w, w_c, x_fp, x_c, b1 @ a1), rel=1e-9)


def _paired(x_fp, x_c, damp):
    from eora_export.compensate.eora import gram_root
    from eora_export.compensate.feedback import PairedGrams, damped

    g_fp, cross, g_c = _grams(x_fp, x_c)
    hessian = damped(g_c, damp)
    return PairedGrams(g_fp, cross, g_c, hessian, gram_root(hessian), damp)


def test_feedback_target_weight_turns_the_objective_into_a_weighted_distance():
    """‖W X_fp − Ŵ X_c‖²/N + δ‖Ŵ − W‖² − ‖(Ŵ − T) R‖² is one constant for every Ŵ."""
    from eora_export.compensate.alternating import feedback_target_weight

    w, w_c, x_fp, x_c = _case(500)
    g = _paired(x_fp, x_c, 0.01)
    t = feedback_target_weight(w, g)
    delta = 0.01 * float(g.gram_c.diagonal().mean())
    gen = torch.Generator().manual_seed(3)
    consts = []
    for w_hat in (w_c, w, t, w + torch.randn(*w.shape, generator=gen, dtype=F64)):
        lhs = _objective(w, 0 * w, x_fp, x_c, w_hat) + delta * float(((w_hat - w) ** 2).sum())
        consts.append(lhs - float(g.root.whiten(w_hat - t).square().sum()))
    assert max(consts) - min(consts) < 1e-9 * max(abs(c) for c in consts)


@pytest.mark.parametrize("quant,sparsity", [("gptq", "none"), ("rtn", "sparsegpt"), ("rtn", "none")])
def test_feedback_alternation_is_never_behind_its_first_round(quant, sparsity):
    """eora-fb-alt per Linear: the kept round's fitted objective is at most round 0's (factors on the
    compressor's W_c), re-compressed codes keep the 2:4 pattern, and GPTQ's codes do change."""
    from types import SimpleNamespace

    from eora_export.compensate.alternating import feedback_alternate_fit, feedback_target_weight
    from eora_export.compress import CompressedLinear
    from eora_export.compress.sparse24 import is_24, magnitude_24
    from eora_export.quant import quantize

    w, _, x_fp, x_c = _case(4000, d_in=128, d_out=64)
    ref = w.float()
    if sparsity != "none":
        ref, _mask = magnitude_24(ref)
    cl = CompressedLinear(quantize(ref, 3, 128), w.float(), sparse24=sparsity != "none")
    conf = CompressConfig(quant=quant, bits=3, group_size=128, sparsity=sparsity)
    run = SimpleNamespace(quant=quant, sparsity=sparsity, compress_config=lambda: conf)
    g = _paired(x_fp, x_c, 0.003)
    cfg = CompensationConfig(rank=8, lowrank_bits=4)
    t = feedback_target_weight(w, g)

    def fitted(rounds: int, rank: int = 8):
        res = feedback_alternate_fit(run, rounds)("layer", cl, g, rank, cfg, None, 0.0)
        w_hat = res.module.weight_q.dequantize().double() + res.module.residual_weight().double()
        return res, float(g.root.whiten(t - w_hat).square().sum())

    first, err0 = fitted(0)
    alt, err3 = fitted(3)
    assert err3 <= err0 * (1 + 1e-12)
    assert alt.error_before == first.error_before > alt.error_after
    # The reported errors are the undamped feedback objective computed from the data.
    w_hat = alt.module.weight_q.dequantize().double() + alt.module.residual_weight().double()
    # (rel 1e-6: the expanded form cancels terms ~50× larger than the error)
    assert alt.error_after == pytest.approx(_objective(w, 0 * w, x_fp, x_c, w_hat), rel=1e-6)
    if cl.sparse24:
        assert is_24(alt.module.weight_q.q)
    if quant == "gptq":
        assert err3 < 0.99 * err0
        assert not torch.equal(alt.module.weight_q.q, cl.weight.q)
    # Rank 0 (from --rank-budget): the compressor's codes or compress(T), whichever fits better.
    zero, err_zero = fitted(3, rank=0)
    assert zero.module.rank == 0
    assert err_zero <= float(g.root.whiten(t - cl.weight.dequantize().double()).square().sum()) * (1 + 1e-12)


def _residual(err, x_fp, x_c):
    from eora_export.compensate.feedback import Residual

    n = x_fp.shape[1]
    return Residual(err @ x_c.T / n, err @ x_fp.T / n, float(err.square().sum()) / n)


def test_residual_term_fits_the_sum_with_the_stream_error():
    """With the residual stream's error E the closed form minimises ‖W X_fp + E − (W_c + BA) X_c‖²/N:
    its cheap metrics equal that objective from the data, it beats random rank-r candidates, and
    it beats the factors fitted without E on it."""
    w, w_c, x_fp, x_c = _case(2000)
    gen = torch.Generator().manual_seed(11)
    # Part of the stream's error is predictable from X_c (what a Linear can absorb), part is not.
    err = 0.3 * torch.randn(w.shape[0], x_c.shape[0], generator=gen, dtype=F64) @ x_c
    err += 0.05 * torch.randn(*err.shape, generator=gen, dtype=F64)
    resid = _residual(err, x_fp, x_c)

    def objective(m):
        return float(((w @ x_fp + err - (w_c + m) @ x_c) ** 2).sum() / x_fp.shape[1])

    b, a, t = feedback_factors(w, w_c, *_grams(x_fp, x_c), 4, resid=resid)
    assert t.before == pytest.approx(objective(0 * w), rel=1e-9)
    assert feedback_error(t, b, a) == pytest.approx(objective(b @ a), rel=1e-9)
    b0, a0, _ = feedback_factors(w, w_c, *_grams(x_fp, x_c), 4)
    assert objective(b @ a) < objective(b0 @ a0) < t.before
    for _ in range(20):
        cb = torch.randn(*b.shape, generator=gen, dtype=F64)
        ca = torch.randn(*a.shape, generator=gen, dtype=F64) * 0.1
        assert objective((b + 1e-3 * cb) @ (a + 1e-3 * ca)) >= objective(b @ a) * (1 - 1e-9)
    # eora-fb-alt's target weight carries E too: T is the unconstrained optimum of the same sum.
    from eora_export.compensate.alternating import feedback_target_weight
    from eora_export.compensate.eora import gram_root
    from eora_export.compensate.feedback import PairedGrams

    grams = _grams(x_fp, x_c)
    g = PairedGrams(*grams, grams[2], gram_root(grams[2]), 0.0, resid)
    t_w = feedback_target_weight(w, g)
    assert objective(t_w - w_c) < objective(b @ a)
    assert objective(t_w - w_c) <= objective(t_w - w_c + 1e-3 * torch.randn(*w.shape, generator=gen, dtype=F64))


def test_walk_with_residual_absorbs_the_stream_error_end_to_end():
    fp, c, lin, calib, grams, compressed = _toy_case(2, 64)
    units = walk_units(list(compressed), "input", grams.owner)
    batches = lambda: [calib[i : i + 8] for i in range(0, 64, 8)]  # noqa: E731
    cfg = CompensationConfig(rank=8, lowrank_bits=16)

    def walk(residual):
        for n, cl in compressed.items():
            set_module(c, n, EoraLinear(cl.weight, sparse24=cl.sparse24))
        pair = None
        if residual:
            def pair(name):
                blk = name.rsplit(".", 1)[0]
                return (fp.get_submodule(blk + ".norm"), c.get_submodule(blk + ".norm")) if name.endswith("down") else None
        res = feedback_walk(units, compressed, lin, c.get_submodule, lambda n, m: set_module(c, n, m), fp, c, batches,
                            cfg, damp=0.0, residual=pair)
        with torch.no_grad():
            return res, float(((c(calib) - fp(calib)) ** 2).mean())

    plain, err_plain = walk(False)
    absorbed, err_absorbed = walk(True)
    # Block 0's stream carries no error yet; block 1's down absorbs what block 0 left.
    assert torch.allclose(absorbed["layers.0.down"].module.residual_weight(), plain["layers.0.down"].module.residual_weight())
    assert not torch.allclose(absorbed["layers.1.down"].module.residual_weight(), plain["layers.1.down"].module.residual_weight())
    assert err_absorbed < err_plain
    # Its reported error is the block output's (larger: it includes the stream's error).
    assert absorbed["layers.1.down"].error_before > plain["layers.1.down"].error_before


def test_residual_source_names_the_norm_opening_each_sublayer(tiny_model_dir):
    from eora_export.models import load_model, residual_source

    model, _ = load_model(tiny_model_dir)
    assert residual_source("model.layers.1.self_attn.o_proj", model) == "model.layers.1.input_layernorm"
    assert residual_source("model.layers.0.mlp.down_proj", model) == "model.layers.0.post_attention_layernorm"
    assert residual_source("self_attn.o_proj", model.model.layers[0]) == "input_layernorm"
    assert residual_source("model.layers.0.self_attn.q_proj", model) is None
    assert residual_source("model.layers.0.mlp.up_proj", model) is None
