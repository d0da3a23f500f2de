"""torch.distributed, as the pipeline uses it: shards, sums across ranks, and agreement checks.

Every function is a no-op in a single process (no initialised process group), so the library runs unchanged
without torchrun. Under ``torchrun`` (or any initialised group: gloo on CPU, NCCL on GPUs) each rank reads its own
shard of a dataset (:func:`rank_share`), every statistic a criterion or BN recalibration gathers is summed across ranks
(:func:`all_reduce_sum`), so scores, pruning decisions and bit plans equal those of one process on the union of the
shards, and :func:`agree` checks cheaply that every rank holds the same thing (a checksum all-gather), failing
with a one-line error naming what differs. Measurements (latencies) run on rank 0 alone and are broadcast
(:func:`on_main`). A rank that waits for a failed one gives up after the process group's timeout.
"""

from __future__ import annotations

import datetime
import os
import zlib
from typing import Any, Callable, Sequence, TypeVar

import torch
import torch.distributed as dist

from .errors import CompressError


TIMEOUT_ENV = "COMPRESS_DIST_TIMEOUT_S"  # how long a rank waits for the others before it fails (default 600)


def init_from_env(device: str = "cpu") -> bool:
    """Join the process group ``torchrun`` describes in the environment (RANK, WORLD_SIZE, MASTER_ADDR/PORT): gloo
    for the CPU, NCCL (one GPU per local rank) for CUDA. A rank that waits longer than ``$COMPRESS_DIST_TIMEOUT_S``
    seconds for the others fails instead of hanging. Returns whether a group of more than one process is set up."""
    if is_distributed() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return is_distributed()
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    try:
        seconds = float(os.environ.get(TIMEOUT_ENV, "600"))
    except ValueError as err:
        raise CompressError(f"{TIMEOUT_ENV}={os.environ[TIMEOUT_ENV]!r} is not a number of seconds",
                            f"set {TIMEOUT_ENV} to e.g. 600") from err
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=seconds))
    return True


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if is_distributed():
        dist.barrier()


def is_distributed() -> bool:
    """Whether a process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    """(rank, world size); (0, 1) in a single process."""
    return (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)


def is_main() -> bool:
    """Whether this process writes outputs (rank 0, or a single process)."""
    return rank_and_world()[0] == 0


def rank_share(indices: Sequence[int]) -> list[int]:
    """This rank's share of ``indices`` (every world-size-th item from the rank's offset: deterministic, the
    shares of all ranks are disjoint and their union is ``indices``)."""
    rank, world = rank_and_world()
    return list(indices[rank::world])


def _collective_device() -> torch.device:
    """gloo reduces CPU tensors, NCCL CUDA ones."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over the ranks (a new tensor on the input's device; the input itself when single)."""
    if not is_distributed():
        return tensor
    work = tensor.detach().to(_collective_device(), copy=True)
    dist.all_reduce(work, op=dist.ReduceOp.SUM)
    return work.to(tensor.device)


def all_reduce_sums(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each tensor of ``tensors`` summed over the ranks (one flattened all-reduce per dtype)."""
    if not is_distributed() or not tensors:
        return tensors
    out: dict[str, torch.Tensor] = {}
    for dtype in {t.dtype for t in tensors.values()}:
        names = [n for n, t in tensors.items() if t.dtype == dtype]
        flat = all_reduce_sum(torch.cat([tensors[n].reshape(-1) for n in names]))
        offset = 0
        for n in names:
            size = tensors[n].numel()
            out[n] = flat[offset:offset + size].view_as(tensors[n]).to(tensors[n].device)
            offset += size
    return out


def agree(value: Any, what: str, fix: str) -> None:
    """A one-line error on every rank when ranks hold a different ``value`` (``what`` it is), compared by the CRC32
    of its ``repr``: one all-gather of one number."""
    if not is_distributed():
        return
    mine = torch.tensor([zlib.crc32(repr(value).encode())], dtype=torch.float64, device=_collective_device())
    gathered = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    values = [int(g.item()) for g in gathered]
    if len(set(values)) > 1:
        raise CompressError(f"the ranks differ in {what} (checksums {', '.join(map(str, values))})", fix)


T = TypeVar("T")


def on_main(compute: Callable[[], T]) -> T:
    """``compute()`` run on rank 0 only and its result sent to every rank (a measurement that must not differ
    between ranks, such as a latency, and that would only be slowed down by running on all of them at once). When
    it raises a CompressError on rank 0, every rank raises that one-line error; other errors on rank 0 reach the
    others as a CompressError naming them. In one process: ``compute()``."""
    if not is_distributed():
        return compute()
    payload: list[Any] = [None]
    if is_main():
        try:
            payload = [("ok", compute())]
        except CompressError as err:
            payload = [("error", err.problem, err.fix)]
        except Exception as err:
            payload = [("error", f"rank 0 failed: {type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}",
                        "see rank 0's output")]
            dist.broadcast_object_list(payload, src=0)
            raise
    dist.broadcast_object_list(payload, src=0)
    if payload[0][0] == "error":
        raise CompressError(payload[0][1], payload[0][2])
    return payload[0][1]
