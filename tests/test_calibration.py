"""Gram accumulation: float64, equal token weights, shared by Linears reading one input."""

import json

import pytest
import torch
from torch import nn

from eora_export.calibration import CalibSource, GramCollector, read_texts
from eora_export.errors import BadInput


class TwoHeads(nn.Module):
    """q and k read the same tensor; o reads another, like attention's projections."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(8, 8, bias=False)
        self.k = nn.Linear(8, 4, bias=False)
        self.o = nn.Linear(8, 8, bias=False)

    def forward(self, x):
        return self.o(torch.relu(self.q(x))) + self.k(x).sum()


def test_shared_gram_and_equal_token_weights():
    torch.manual_seed(0)
    model = TwoHeads()
    batches = [torch.randn(1, 5, 8), torch.randn(3, 7, 8), torch.randn(2, 1, 8)]  # uneven sizes
    linears = {"q": model.q, "k": model.k, "o": model.o}
    with GramCollector(linears) as col:
        for b in batches:
            model(b)
            col.end_batch()
    store = col.store
    assert store.owner["k"] == store.owner["q"] != store.owner["o"]
    assert len(store.sums) == 2
    x = torch.cat([b.reshape(-1, 8) for b in batches]).double()
    assert torch.allclose(store.gram("q"), x.T @ x / x.shape[0], rtol=1e-12, atol=1e-14)
    assert store.gram("q").dtype == torch.float64
    h = torch.cat([torch.relu(model.q(b)).reshape(-1, 8) for b in batches]).double()
    assert torch.allclose(store.gram("o"), h.T @ h / h.shape[0], rtol=1e-6)
    assert store.tokens[store.owner["q"]] == 5 + 21 + 2


def test_float64_accumulation_keeps_digits():
    # 200k tokens of a large-offset input: float32 sums would lose the small variance.
    lin = nn.Linear(2, 2, bias=False)
    x = torch.full((200_000, 2), 1000.0) + torch.randn(200_000, 2) * 1e-2
    with GramCollector({"l": lin}) as col:
        for chunk in x.split(10_000):
            lin(chunk)
            col.end_batch()
    direct = x.double().T @ x.double() / x.shape[0]
    assert torch.allclose(col.store.gram("l"), direct, rtol=1e-12)


def test_nan_activations_are_refused_with_the_layer_name():
    lin = nn.Linear(4, 4)
    with GramCollector({"model.layers.0.mlp.up_proj": lin}):
        with pytest.raises(BadInput, match="up_proj"):
            lin(torch.tensor([[1.0, float("nan"), 0.0, 0.0]]))


def test_read_texts_formats_and_errors(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("first doc\nline\n\nsecond doc\n")
    assert read_texts(txt) == ["first doc\nline", "second doc"]
    jl = tmp_path / "b.jsonl"
    jl.write_text(json.dumps({"text": "x y"}) + "\n\n" + json.dumps({"text": "z"}) + "\n")
    assert read_texts(jl) == ["x y", "z"]
    (tmp_path / "bad.jsonl").write_text("{not json}\n")
    with pytest.raises(BadInput, match=r"bad\.jsonl:1"):
        read_texts(tmp_path / "bad.jsonl")
    (tmp_path / "bin.txt").write_bytes(b"\x00\x01\x02")
    with pytest.raises(BadInput, match="binary"):
        read_texts(tmp_path / "bin.txt")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(BadInput, match="empty"):
        read_texts(tmp_path / "empty.txt")
    with pytest.raises(BadInput, match="not found"):
        read_texts(tmp_path / "missing.txt")


def test_calib_source_weights():
    assert CalibSource.parse("data.txt:0.25").weight == 0.25
    assert CalibSource.parse("data.txt").weight == 1.0
    assert str(CalibSource.parse("C:/x/data.txt").path) == "C:/x/data.txt"
