"""Thread count for the compressors' many small elementwise ops."""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def single_thread():
    """Run elementwise work on one thread; yields the previous thread count (for BLAS calls inside).

    The column loop and the quantizer are many small elementwise ops; on a busy 2-core
    machine OpenMP barriers between two threads cost several times the work itself
    (measured: GPTQ on 4096² in 56 s with 2 threads vs 11 s with 1; RTN of the demo
    model 20 s vs 0.6 s). Matrix products and factorizations keep the caller's count.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield before
    finally:
        torch.set_num_threads(before)
