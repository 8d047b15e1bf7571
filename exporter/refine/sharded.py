"""End-to-end refinement sharded over the ranks (FSDP2, `--e2e-parallel fsdp`, or `auto` where data-parallel
does not fit): every decoder layer of the student is `fully_shard`-ed, so each rank keeps 1/W of each layer's
weights, factors, gradients and Adam moments; a layer is gathered whole while it runs (and again while it is
recomputed in the backward pass), and the factors' gradients are reduce-scattered, averaged over the ranks as
DistributedDataParallel averages them. The embeddings, the final norm and lm_head are not trained: they stay
whole on every rank (the teacher's and the student's logits both go through them).

Offloaded (`--e2e-parallel fsdp-offload`: FSDP2's CPUOffloadPolicy), each rank's shards, their gradients and
so Adam's steps and moments are in host memory; a layer is copied to the device as it is gathered (for 70B, whose
shards do not fit eight 80 GB GPUs: docs/results/e2e-memory.md).

The sharded student is a copy of the decoder layers, made and sharded one layer at a time, so no rank holds more
than one whole layer besides its shards; the model's own layers stay as they are (a streamed model's on `meta`).
After the optimisation `gather_factors_` brings the refined factors of one layer back whole, into that layer
(`whole_factors`: for the resume state, before that).
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor

from ..model.activations import Activations
from .e2e import student_hidden
from .optimise import factors


class ShardedStudent(nn.Module):
    """The decoder layers, each one sharded, as refine/optimise.py calls the student: batch index → the last
    decoder layer's output. The root of the FSDP tree (it has no parameters of its own)."""

    def __init__(self, layers: list[nn.Module], inputs: Activations, device):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self._rest = (inputs, torch.device(device))  # not modules: kept out of the module tree

    def forward(self, b: int) -> torch.Tensor:
        inputs, device = self._rest
        return student_hidden(self.layers, inputs, b, device)


def shard_layer(layer: nn.Module, device, compute_dtype: torch.dtype, offload: bool = False) -> nn.Module:
    """A sharded copy of one whole decoder layer: its factors in float32 (the master copies: they train) and
    everything else frozen in the compute dtype; gathered in the compute dtype for the matmuls (FSDP's mixed
    precision takes autocast's place for the factors), the gradients reduced in float32. `offload`: the shards
    in host memory (pinned on a GPU, for the copies to the device)."""
    shard = copy.deepcopy(layer).to(device)
    for param in shard.parameters():
        param.requires_grad_(False)
    for param in factors(shard):
        param.data = param.data.float()
        param.requires_grad_(True)
    half = compute_dtype != torch.float32
    fully_shard(shard, mp_policy=MixedPrecisionPolicy(param_dtype=compute_dtype if half else None,
                                                      reduce_dtype=torch.float32),
                offload_policy=CPUOffloadPolicy(pin_memory=torch.device(device).type == "cuda") if offload
                else OffloadPolicy())
    return shard


def sharded_student(layers, inputs: Activations, device, compute_dtype: torch.dtype,
                    offload: bool = False) -> ShardedStudent:
    """The student of `layers`: `layers` yields each whole decoder layer in turn (it may load it, and put it back
    after), and only its shard is kept (in host memory when `offload`)."""
    student = ShardedStudent([shard_layer(layer, device, compute_dtype, offload) for layer in layers], inputs,
                             device)
    fully_shard(student)
    return student


def whole(param: DTensor) -> torch.Tensor:
    """A sharded parameter gathered whole from every rank's shard. An offloaded shard is in host memory and the
    process group's collectives want the mesh's device (NCCL: a GPU): it goes there first."""
    local = param.to_local()
    on = param.device_mesh.device_type
    if local.device.type != on:
        local = local.to(on if on != "cuda" else torch.device("cuda", torch.cuda.current_device()))
        param = DTensor.from_local(local, param.device_mesh, param.placements, run_check=False,
                                   shape=param.shape, stride=param.stride())
    return param.full_tensor()


@torch.no_grad()
def whole_factors(shard: nn.Module):
    """(name in the layer, whole tensor) of each refined factor of one sharded layer, in float32 (every rank
    takes part: all-gather); the rest is frozen."""
    trained = {id(p) for p in factors(shard)}
    for name, param in shard.named_parameters():
        if id(param) in trained:
            yield name, whole(param)


@torch.no_grad()
def gather_factors_(shard: nn.Module, layer: nn.Module) -> None:
    """The refined factors of one sharded layer copied whole into `layer`, in `layer`'s own dtypes."""
    own = dict(layer.named_parameters())
    for name, value in whole_factors(shard):
        own[name].copy_(value)


def is_sharded(module: nn.Module) -> bool:
    return isinstance(module, FSDPModule)
