"""How the loop spreads a step over ranks: one process, DDP, or FSDP2 (``train.parallel``).

DDP replicates the network and the objective and all-reduces their gradients. FSDP2
(``fully_shard``, one unit per transformer block plus the root) shards the network and its
EMA over the ranks; the objective's heads (projectors, small) stay replicated, and their
gradients are averaged in one all-reduce. FSDP2 checkpoints are written sharded; evaluations
sample from a whole copy of the EMA, gathered on every rank.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.distributed as dist


class Replicated:
    """One process, or DDP over the ranks."""

    sharded = False

    def __init__(self, world: int, device: torch.device, find_unused: bool):
        self.world, self.device, self.find_unused = world, device, find_unused
        self.build_device = device  # where the network and its EMA are built and restored

    def wrap(self, train_step: torch.nn.Module, model, ema, optimizer, trainable: Callable[[], list]):
        """(the module to call for a step, the optimizer over the parameters as they now are);
        ``trainable()`` lists the optimizer's parameters, in its order, as they are when called."""
        if self.world == 1:
            return train_step, optimizer
        ddp = torch.nn.parallel.DistributedDataParallel(
            train_step,
            device_ids=[self.device.index] if self.device.type == "cuda" else None,
            find_unused_parameters=self.find_unused,
        )
        return ddp, optimizer

    def no_sync(self, module, last: bool):
        """The context of a micro-batch's backward: gradients are reduced after the last one only."""
        return contextlib.nullcontext() if self.world == 1 or last else module.no_sync()

    def reduce_head_gradients(self, heads: list[torch.nn.Parameter]) -> None:
        """DDP reduced them with the rest."""

    def clip_gradients(self, params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
        """Clip to ``max_norm`` (inf: measure only); the global norm before clipping."""
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    def whole(self, module: torch.nn.Module, build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
        """The module with all its weights on this rank (for sampling)."""
        return module


class Sharded(Replicated):
    """FSDP2: the network and its EMA sharded block by block; the objective's heads replicated."""

    sharded = True

    def __init__(self, world: int, device: torch.device, precision: str):
        super().__init__(world, device, find_unused=False)
        # fully_shard moves each unit's parameters to the mesh's device as it shards them: built on the
        # host, the whole network and EMA never sit on the accelerator (at most one block whole at a time)
        self.build_device = torch.device("cpu")
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy

        self.mesh = init_device_mesh(device.type, (world,))
        self.copy = None  # the whole copy that evaluations sample from
        dtypes = {"fp32": None, "bf16": torch.bfloat16}
        self.policy = MixedPrecisionPolicy(param_dtype=dtypes[precision], reduce_dtype=torch.float32)

    def shard(self, network: torch.nn.Module) -> None:
        from torch.distributed.fsdp import fully_shard

        for block in network.blocks:
            fully_shard(block, mesh=self.mesh, mp_policy=self.policy)
        fully_shard(network, mesh=self.mesh, mp_policy=self.policy)

    def wrap(self, train_step, model, ema, optimizer, trainable):
        """Shard in place (fully_shard swaps the network's parameters for shards), then move the
        optimizer and its restored state onto them."""
        old = trainable()
        self.shard(model)
        self.shard(ema)
        return train_step, _moved_optimizer(optimizer, old, trainable())

    def no_sync(self, module, last: bool):
        module.model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def reduce_head_gradients(self, heads: list[torch.nn.Parameter]) -> None:
        # A head with a gradient on any rank is reduced on all (zero where a batch gave none); one
        # without a gradient anywhere keeps None, so AdamW leaves it alone as DDP's unused parameters.
        anywhere = torch.tensor([float(p.grad is not None) for p in heads], device=self.device)
        dist.all_reduce(anywhere, op=dist.ReduceOp.MAX)
        for p, used in zip(heads, anywhere.tolist()):
            if used and p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p, used in zip(heads, anywhere.tolist()) if used]
        if grads:
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat)
            flat /= self.world
            pieces = flat.split([g.numel() for g in grads])
            torch._foreach_copy_(grads, [piece.view_as(g) for piece, g in zip(pieces, grads)])

    def clip_gradients(self, params, max_norm):
        """The norm over the shards (one all-reduce) and the replicated heads, then one scale for all."""
        grads = [p.grad for p in params if p.grad is not None]
        shards = [g for g in grads if hasattr(g, "full_tensor")]
        heads = [g for g in grads if not hasattr(g, "full_tensor")]
        squares = sum(float(_full(torch.nn.utils.get_total_norm(group))) ** 2 for group in (shards, heads) if group)
        norm = squares**0.5
        scale = max_norm / (norm + 1e-6)  # clip_grad_norm_'s coefficient
        if scale < 1.0:
            for group in (shards, heads):  # DTensors and tensors do not mix in one foreach call
                if group:
                    torch._foreach_mul_(group, scale)
        return torch.tensor(norm)

    def whole(self, module, build):
        """A plain copy holding the whole weights: every rank gathers them (a collective). The copy is
        built once, outside the global random stream (a resumed run draws what a straight one does)."""
        full = {name: _full(value) for name, value in module.state_dict().items()}
        if self.copy is None:
            with torch.random.fork_rng(devices=[]):
                self.copy = build().to(self.device).eval().requires_grad_(False)
        self.copy.load_state_dict(full)
        return self.copy


def _full(value: torch.Tensor) -> torch.Tensor:
    return value.full_tensor() if hasattr(value, "full_tensor") else value


def _moved_optimizer(optimizer: torch.optim.Optimizer, old: list, new: list) -> torch.optim.Optimizer:
    """An optimizer of the same kind and settings over ``new``, with ``old``'s state moved onto it (whole
    tensors distributed like their parameter)."""
    from torch.distributed.tensor import distribute_tensor

    groups, index = [], 0
    for group in optimizer.param_groups:
        count = len(group["params"])
        # the fused kernel refuses a mix of sharded and replicated (projector) parameters: torch's own path
        settings = {k: v for k, v in group.items() if k != "params"} | {"fused": None}
        groups.append({**settings, "params": new[index : index + count]})
        index += count
    moved = type(optimizer)(groups)
    for before, after in zip(old, new):
        state = optimizer.state.get(before)
        if not state:
            continue
        moved.state[after] = {
            key: distribute_tensor(value.to(after.device), after.device_mesh, after.placements)
            if torch.is_tensor(value) and value.shape == before.shape and hasattr(after, "device_mesh")
            else value
            for key, value in state.items()
        }
    return moved


def make_parallel(kind: str, world: int, device: torch.device, find_unused: bool, precision: str) -> Replicated:
    if kind == "fsdp" and world > 1:
        return Sharded(world, device, precision)
    return Replicated(world, device, find_unused)
