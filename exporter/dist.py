"""Several processes under torchrun, on torch.distributed: what each rank is, and the few collectives the
stages use. One process (no torchrun) is world size 1 and every function here is then the identity.

    torchrun --nproc_per_node N -m exporter.cli ...      (gloo on CPUs, NCCL on GPUs)

The layer loop splits the calibration batches (and the evaluation windows) across ranks: each rank carries
its own share of the streams, the statistics of a layer are summed over all of them (all_reduce), the
matrices of a layer are factorized by one rank each and broadcast, refinement runs data-parallel (DDP; end-to-end
refinement sharded with FSDP2 where it must be: refine/sharded.py), and rank 0 alone writes the output folder.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from pathlib import Path

import torch
import torch.distributed as dist


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def launched_rank() -> int:
    """This process's rank as torchrun set it in the environment (0 without torchrun), before the group is joined."""
    return int(os.environ.get("RANK", "0"))


def init_from_env(device: torch.device) -> None:
    """Join the process group torchrun describes in the environment (WORLD_SIZE > 1); nothing otherwise."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or (dist.is_available() and dist.is_initialized()):
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    # Rank 0 writes the dense ONNX graph while the others wait at the first collective: minutes at 7B–70B
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(hours=6))


@contextlib.contextmanager
def group_of_one(device: torch.device, folder: Path):
    """A process group of this process alone while the block runs, for FSDP2 in one process (end-to-end
    refinement offloaded to the host: refine/sharded.py); `folder` holds its rendezvous file. Under torchrun (a
    group already joined): nothing. World size 1: every function above stays the identity."""
    if dist.is_available() and dist.is_initialized():
        yield
        return
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                            init_method=f"file://{Path(folder) / 'process-group'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def local_device(device: torch.device) -> torch.device:
    """This rank's device: cuda:LOCAL_RANK under torchrun on GPUs."""
    if device.type == "cuda" and active():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def shard(items: list) -> list:
    """This rank's share of `items`: every world_size-th one from its rank (index b goes to rank b % world)."""
    return items[rank()::world_size()]


def all_reduce_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over the ranks, in place (the identity in one process). gloo reduces float64 on CPUs; NCCL too."""
    if active():
        dist.all_reduce(tensor)
    return tensor


def _reduce_floats(values, op) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    if not active():
        return t.tolist()
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=op)
    return t.cpu().tolist()


def sum_floats(*values: float) -> list[float]:
    """Sums over the ranks of a few numbers, in float64."""
    return _reduce_floats(values, dist.ReduceOp.SUM if active() else None)


def min_floats(*values: float) -> list[float]:
    """Minimums over the ranks of a few numbers."""
    return _reduce_floats(values, dist.ReduceOp.MIN if active() else None)


def broadcast_objects(objects: list, src: int) -> list:
    """Picklable objects from rank `src` to every rank (in place in `objects`)."""
    if active():
        dist.broadcast_object_list(objects, src=src)
    return objects
