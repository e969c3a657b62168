"""The shared quantizer: value convention, packing, bit ranges."""

import pytest
import torch

from eora_export.quant import dequantize, pack_int4, quantize, unpack_int4


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_codes_in_range_and_values_are_fp16_products(bits):
    w = torch.randn(32, 256, generator=torch.Generator().manual_seed(bits))
    m = quantize(w, bits, 64)
    assert m.q.dtype == torch.int8 and m.scale.dtype == torch.float16 and m.scale.shape == (32, 4)
    assert m.q.min() >= -(2 ** (bits - 1)) and m.q.max() <= 2 ** (bits - 1) - 1
    expect = (m.q.float() * m.scale.float().repeat_interleave(64, 1)).half()
    assert torch.equal(m.dequantize(), expect)
    # Round to nearest: the error is at most half a step (plus fp16 rounding of the product).
    step = m.scale.float().repeat_interleave(64, 1)
    assert ((m.dequantize().float() - w).abs() <= step * 0.5 + 1e-3 * w.abs() + 1e-6).all()


def test_clip_search_never_worse_than_plain():
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(0)) ** 3
    plain = (quantize(w, 3, 128).dequantize().float() - w).square().sum()
    clipped = (quantize(w, 3, 128, clip_search=True).dequantize().float() - w).square().sum()
    assert clipped <= plain


def test_zero_groups_and_16_bit():
    w = torch.zeros(4, 128)
    w[0, :64] = 1.0
    m = quantize(w, 4, 64)
    assert torch.equal(m.dequantize().float(), w)
    m16 = quantize(torch.randn(4, 8), 16, 0)
    assert m16.scale is None and m16.dequantize().dtype == torch.float16


def test_pack_int4_layout_and_round_trip():
    q = torch.tensor([[1, -2, 7, -8]], dtype=torch.int8)
    p = pack_int4(q)
    assert p.tolist() == [[0xE1, 0x87]]  # element 0 in the low nibble (ONNX INT4 layout)
    r = torch.randint(-8, 8, (5, 6, 10), dtype=torch.int8)
    assert torch.equal(unpack_int4(pack_int4(r)), r)
    with pytest.raises(ValueError, match="odd"):
        pack_int4(torch.zeros(2, 3, dtype=torch.int8))


def test_bad_group_size_message():
    with pytest.raises(ValueError, match="group size 100 does not divide"):
        quantize(torch.randn(4, 256), 4, 100)


def test_dequantize_matches_storage_bytes():
    m = quantize(torch.randn(16, 256), 4, 128)
    assert m.storage_bytes() == 16 * 256 // 2 + 16 * 2 * 2
    assert torch.equal(dequantize(m.q, m.scale, 128), m.dequantize())
