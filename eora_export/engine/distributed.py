"""Past one machine: the block walk spread over ``torch.distributed`` ranks, launched by torchrun.

Each rank owns a contiguous range of decoder blocks (:func:`block_range`) and reads only their
weights (the checkpoint is memory-mapped tensor by tensor). Hidden states cross rank boundaries
with send/recv over gloo: between blocks they live in CPU memory, also with ``--device cuda``.

Two schedules, both giving exactly the single-process streamed outputs (tests compare them):

* **parallel** (FP calibration inputs and methods fitted on them alone: eora, svd, none, and
  ``--rank-budget``): (1) the FP chain: each rank pushes the calibration inputs through its
  blocks' FP forward and hands them on, so every rank soon holds its first block's inputs;
  (2) fit: every rank compresses and compensates its blocks at the same time — the bulk of the
  work — writing each block's module sets; (3) paths: the held-out, sweep and validation
  hidden states flow rank to rank through the finished blocks (forward passes only).
* **sequential** (``--stream-inputs compressed``, ``eora-fb``, ``lsi``, ``lsi+eora``): block i
  needs the compressed output of block i − 1, so rank r starts when rank r − 1 hands over every
  path; the ranks split memory and disk, not time.

Outputs: the work folder (``--work-dir``, default ``<out>.stream-work``) must be one folder all
ranks see (a shared file system across machines). Each rank writes its own block files and
manifest (``r{rank}-...``); the last rank scores the held-out texts, builds the report from every
rank's manifest and assembles the output folder. Per-node work folders merged afterwards are
not supported.

Failures: an error on any rank is reported as one line naming the rank and the block; torchrun
then stops the others. ``--resume`` with the same command continues every rank from its own
last finished block (with the same number of ranks: the fingerprint holds it).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import timedelta

import torch
from torch import Tensor

from ..errors import EoraError, UsageError
from .state import WorkFolder
from .walk import Plan, _on, propagate_block, walk

# A rank may wait for the whole range of the ranks before it (sequential schedule): hours on
# big models. A dead peer is noticed sooner: torchrun stops every rank when one exits.
WAIT_TIMEOUT = timedelta(hours=72)


@dataclass(frozen=True)
class Ranks:
    """This process's place among the ranks of a torchrun launch."""

    rank: int
    world: int
    owns_group: bool = False  # from_env made the process group, so leave() ends it

    @property
    def first(self) -> bool:
        return self.rank == 0

    @property
    def last(self) -> bool:
        return self.rank == self.world - 1

    def tag(self) -> str:
        return f"r{self.rank}-"


def from_env() -> Ranks | None:
    """The ranks of a torchrun launch (WORLD_SIZE > 1), the process group joined; None otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    import torch.distributed as dist

    made = not dist.is_initialized()
    if made:
        dist.init_process_group("gloo", timeout=WAIT_TIMEOUT)
    if torch.cuda.is_available():  # --device cuda/auto: one GPU per local rank
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return Ranks(dist.get_rank(), dist.get_world_size(), owns_group=made)


def leave(ranks: Ranks) -> None:
    """End the process group :func:`from_env` made, once every rank is past its last collective.

    Gloo's worker threads still alive when the interpreter finalizes abort a rank that has
    finished its work ("terminate called without an active exception", SIGABRT), so torchrun
    reports a run that wrote its output as failed: 2 of 30 bare two-rank launches without this,
    0 of 60 with it. Called after success only: a rank that failed may have work pending that
    ending the group would wait on. A group the caller made is the caller's to end.
    """
    import torch.distributed as dist

    if ranks.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def block_range(num_layers: int, ranks: Ranks) -> range:
    """The contiguous blocks of one rank: an even split, the first ranks taking one more."""
    if ranks.world > num_layers:
        raise UsageError(f"{ranks.world} processes for a model of {num_layers} blocks; launch at most {num_layers}")
    base, extra = divmod(num_layers, ranks.world)
    lo = ranks.rank * base + min(ranks.rank, extra)
    return range(lo, lo + base + (1 if ranks.rank < extra else 0))


def send(streams: dict[str, Tensor], dst: int) -> int:
    """Send named tensors to rank ``dst``; returns the bytes sent."""
    import torch.distributed as dist

    keys = sorted(streams)
    dist.send_object_list([[(k, tuple(streams[k].shape), str(streams[k].dtype).removeprefix("torch.")) for k in keys]], dst=dst)
    for k in keys:
        dist.send(streams[k].contiguous(), dst=dst)
    return sum(streams[k].numel() * streams[k].element_size() for k in keys)


def recv(src: int) -> dict[str, Tensor]:
    """The named tensors :func:`send` sent from rank ``src``."""
    import torch.distributed as dist

    meta: list = [None]
    dist.recv_object_list(meta, src=src)
    out = {}
    for k, shape, dtype in meta[0]:
        out[k] = torch.empty(shape, dtype=getattr(torch, dtype))
        dist.recv(out[k], src=src)
    return out


def barrier() -> None:
    import torch.distributed as dist

    dist.barrier()


def all_gather(obj) -> list:
    import torch.distributed as dist

    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


@contextmanager
def naming(ranks: Ranks, where: Callable[[], str]) -> Iterator[None]:
    """Errors leave this rank as one line that names it and the block it was on."""
    try:
        yield
    except EoraError as e:
        e.args = (f"rank {ranks.rank} ({where()}): {e}",)
        raise
    except (KeyboardInterrupt, MemoryError):
        raise
    except Exception as e:
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
        raise RuntimeError(f"rank {ranks.rank} ({where()}): {type(e).__name__}: {first}") from e


def parallel_schedule(plan: Plan, cfg) -> bool:
    """Whether the fit needs nothing but the FP calibration inputs (the parallel schedule)."""
    from ..methods import get_method

    if cfg.stream_inputs != "fp":
        return False
    return not any(get_method(m).own_stream or get_method(m).requantize is not None for m in plan.methods)


@torch.no_grad()
def fp_chain(ranks: Ranks, src, cfg, plan: Plan, blocks: range, first: Callable[[], dict[str, Tensor]],
             stats: dict) -> dict[str, Tensor]:
    """The FP inputs of this rank's first block: received (or embedded on rank 0), then pushed
    through this rank's FP blocks and handed to the next rank."""
    from .block import BlockHost, run_block

    inputs = first() if ranks.first else recv(ranks.rank - 1)
    if not ranks.last:
        x = inputs
        with _on(plan.device):
            rotary = src.rotary(plan.device)
            for i in blocks:
                host = BlockHost(src.load_layer(i, plan.device), i, rotary, src.config)
                x = {k: run_block(host, v, cfg.batch_size, plan.act_dtype, f"block {i}") for k, v in x.items()}
                del host
        stats["bytes_sent"] += send(x, ranks.rank + 1)
    return inputs


def walk_ranks(ranks: Ranks, src, cfg, plan: Plan, first_streams: Callable[[], dict[str, Tensor]], folder, fp: dict,
               progress: bool, on_block_done=None, tag: str = "", desc: str = "blocks") -> tuple[dict | None, dict]:
    """This rank's share of one walk; returns (the paths after the last block on the last rank,
    else None; this rank's manifest)."""
    blocks = block_range(src.num_layers, ranks)
    work = WorkFolder(folder, tag + ranks.tag())
    manifest = work.start(fp, src.num_layers, cfg.resume, first_block=blocks.start)
    stats = {"rank": ranks.rank, "blocks": [blocks.start, blocks.stop], "resumed_from_block": None, "bytes_sent": 0}
    if manifest["next_block"] > blocks.start:
        stats["resumed_from_block"] = manifest["next_block"]
    manifest["comm"] = stats
    where = [lambda: f"block {manifest['next_block']}"]
    with naming(ranks, lambda: where[0]()):
        if plan.ladders or parallel_schedule(plan, cfg):
            fit_keys = ("calib", "val") if plan.ladders else ("calib",)
            inputs = fp_chain(ranks, src, cfg, plan, blocks,
                              lambda: {k: v for k, v in first_streams().items() if k in fit_keys}, stats)
            fit_plan = plan if plan.ladders else replace(plan, save_sets=True)
            walk(src, cfg, fit_plan, lambda: inputs, work, manifest, True, progress, on_block_done, desc, blocks)
            if plan.ladders:
                return None, manifest
            # The other paths, through the finished blocks.
            paths = ({k: v for k, v in first_streams().items() if k != "calib"} if ranks.first else recv(ranks.rank - 1))
            with _on(plan.device):
                rotary = src.rotary(plan.device)
            for i in blocks:
                where[0] = lambda i=i: f"block {i}, held-out paths"
                paths = propagate_block(src, i, paths, cfg, plan, rotary, work, manifest["blocks"][str(i)])
        else:
            received = first_streams() if ranks.first else recv(ranks.rank - 1)
            paths = walk(src, cfg, plan, lambda: received, work, manifest, True, progress, on_block_done, desc, blocks)
        if not ranks.last:
            stats["bytes_sent"] += send(paths, ranks.rank + 1)
            return None, manifest
        return paths, manifest


def merged_blocks(folder, num_layers: int, world: int, tag: str = "") -> list[dict]:
    """Every block's manifest entry, from each rank's manifest (the last rank, after a barrier)."""
    import json

    entries: dict[str, dict] = {}
    for r in range(world):
        manifest = json.loads(WorkFolder(folder, f"{tag}r{r}-").manifest_path.read_text())
        entries.update(manifest["blocks"])
    return [entries[str(i)] for i in range(num_layers)]


def clear(folder, world: int) -> None:
    for r in range(world):
        for tag in ("", "alloc-"):
            WorkFolder(folder, f"{tag}r{r}-").clear()
