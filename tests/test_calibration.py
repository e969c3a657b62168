"""Gram accumulation: float64, equal token weights, shared by Linears reading one input; calibration and
validation windows spread over the whole text."""

import json

import pytest
import torch
from torch import nn

from eora_export.calibration import (
    CalibSource,
    GramCollector,
    calibration_windows,
    read_texts,
    source_windows,
    spread_indices,
    spread_text,
    validation_windows,
)
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


class CharTokenizer:
    """One token per character (its code point), EOS 0: windows can be read back as text."""

    eos_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}


def _sections(tmp_path, letters="abcd", docs_per=30, doc_len=40):
    """A file ordered by source, as concatenated corpora are: all 'a' documents, then all 'b', …"""
    path = tmp_path / "calib.txt"
    path.write_text("\n\n".join(ch * doc_len for ch in letters for _ in range(docs_per)))
    return path


def _letters(windows):
    return {chr(t) for w in windows for t in w.tolist() if t}


def test_calibration_windows_cover_a_source_ordered_file(tmp_path):
    src = [CalibSource(_sections(tmp_path))]  # 4 × 30 docs of 41 tokens: 76 windows of 64
    calib = calibration_windows(CharTokenizer(), src, 8, 64)
    assert calib.shape == (8, 64)
    # The head of the file is all 'a': windows taken from it would miss three of the four sources.
    assert _letters(calib) == set("abcd")
    val = validation_windows(CharTokenizer(), src, 8, 4, 64)
    assert val.shape == (4, 64) and _letters(val) == set("abcd")
    fit_rows = {tuple(w.tolist()) for w in calib}
    windows_at = {tuple(w.tolist()): i for i, w in enumerate(calibration_windows(CharTokenizer(), src, 1000, 64))}
    assert not {windows_at[tuple(w.tolist())] for w in val} & {windows_at[r] for r in fit_rows}  # never fitted on
    # The fitting windows do not depend on how many validation windows are asked for.
    for val_n in (0, 4, 40):
        assert torch.equal(source_windows(CharTokenizer(), src[0].path, 8, val_n, 64)[0], calib)


def test_short_text_gives_every_window_in_order(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("x" * 200)
    calib = calibration_windows(CharTokenizer(), [CalibSource(path)], 50, 64)
    assert calib.shape == (3, 64)  # 201 tokens with EOS: three whole windows
    assert validation_windows(CharTokenizer(), [CalibSource(path)], 50, 8, 64).shape[0] == 0


def test_spread_indices():
    assert spread_indices(5, 8) == [0, 1, 2, 3, 4]
    idx = spread_indices(100, 4)
    assert idx == sorted(set(idx)) and len(idx) == 4 and idx[0] < 25 <= idx[1] < 50 <= idx[2] < 75 <= idx[3]


def test_spread_text_bounds_huge_files_and_keeps_every_region():
    docs = [ch * 1000 for ch in "abcdefghij"]  # 10 000 characters, one letter per tenth
    assert spread_text(docs, 10_000, 5) == docs  # fits: unchanged
    cut = spread_text(docs, 2_000, 5)
    assert sum(map(len, cut)) <= 2_000
    assert {d[0] for d in cut} == set("acegi")  # five evenly spaced spans of 400 characters
    one = spread_text(["".join(docs)], 2_000, 5)  # one giant document is cut as well
    assert sum(map(len, one)) <= 2_000 and {d[0] for d in one} == set("acegi")
