"""Gradients averaged across ranks over the ranks that hold them.

Each rank trains one randomly drawn stream per step, so a per-stream tensor has a gradient on some ranks and
none on others (plain DDP errors on such unused parameters). `average_gradients` sums every gradient and a
holder count in ONE all-reduce and divides each gradient by the number of ranks that held it; a tensor that no
rank trained keeps no gradient. Afterwards every rank holds the same gradients.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist


def mean_over_holders(grads: Sequence[Sequence[torch.Tensor | None]]) -> list[torch.Tensor | None]:
    """The reference definition: `grads[rank][i]` (None: rank did not train tensor i) -> per tensor the mean over
    the ranks that hold it (None when no rank does)."""
    out = []
    for per_rank in zip(*grads):
        held = [g for g in per_rank if g is not None]
        out.append(torch.stack(held).mean(dim=0) if held else None)
    return out


def average_gradients(params: Sequence[torch.nn.Parameter], group: dist.ProcessGroup | None = None) -> None:
    """Replace every `p.grad` of `params` by the mean over the ranks of `group` that hold a gradient for `p`.

    Every rank must pass the same parameters in the same order (all of one dtype and device). A parameter whose
    gradient no rank holds keeps `grad = None`; a rank without one receives the mean. No-op without an
    initialised process group or with one rank.
    """
    if not params or not dist.is_available() or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return
    first = params[0]
    pieces = [p.grad.reshape(-1) if p.grad is not None else first.new_zeros(p.numel()) for p in params]
    held = torch.tensor([p.grad is not None for p in params], dtype=first.dtype, device=first.device)
    buffer = torch.cat([*pieces, held])
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=group)
    counts = buffer[-len(params):].tolist()
    offset = 0
    for p, count in zip(params, counts):
        total = buffer[offset:offset + p.numel()].view_as(p)
        offset += p.numel()
        if count == 0:
            p.grad = None
        elif p.grad is None:
            p.grad = total / count
        else:
            p.grad.copy_(total / count)
