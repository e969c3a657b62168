"""Shared fixtures: a tiny random Llama with its own tokenizer, saved like a HF folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    # pyproject runs one worker per core: a second torch thread per worker would only fight the
    # other worker for the same cores (OpenMP workers spin-wait for cores others hold).
    torch.set_num_threads(1)

# The test files that take longest on one worker (`pytest --durations=30`, 2026-12-01: the ranking
# run alone 228 s; streaming, distributed and demo e2e 170-220 s each). xdist hands out whole files
# in collection order (pyproject: --dist loadfile --no-loadscope-reorder), so these start first
# and the short files fill in around them, instead of one long file running alone at the end.
LONGEST_FIRST = ("test_demo_ranking.py", "test_streaming.py", "test_distributed.py", "test_demo_e2e.py",
                 "test_pipeline.py", "test_gpu_check.py", "test_interrupt.py")


def pytest_collection_modifyitems(items: list) -> None:
    order = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: order.get(item.path.name, len(order)))  # stable: other files keep their order


TEXT = (
    "The quick brown fox jumps over the lazy dog. Compression of language models trades accuracy for speed. "
    "Low-rank factors recover part of the lost accuracy without any training. "
    "Calibration data is a few hundred sequences of ordinary text. "
) * 40


def make_tiny_model_dir(path: Path, hidden: int = 128, inter: int = 256, layers: int = 2, seed: int = 0) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(path)
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=len(fast), max_position_embeddings=256, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg)
    model.to(torch.float16).save_pretrained(path)
    (path / "calib.txt").write_text(TEXT)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny matrices run faster on one thread, and far faster on a busy machine, where
    OpenMP workers spin-wait for cores other processes hold. Restored afterwards.
    Use with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
