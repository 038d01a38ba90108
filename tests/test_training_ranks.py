"""Gradient averaging over the ranks that hold a gradient: the pure definition, and the all-reduce on 2 gloo
processes (loopback)."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fnn_model.training.ranks import average_gradients, mean_over_holders

SHAPES = [(3,), (2, 2), (4,), (1,)]


def rank_gradients(rank: int) -> list[torch.Tensor | None]:
    """Rank 0 holds gradients of tensors 0, 1 and 3, rank 1 of tensors 0 and 2."""
    held = {0: (0, 1, 3), 1: (0, 2)}[rank]
    generator = torch.Generator().manual_seed(10 + rank)
    return [torch.randn(shape, generator=generator) if i in held else None for i, shape in enumerate(SHAPES)]


def test_mean_over_holders_by_hand() -> None:
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0])
    both, one, none = mean_over_holders([[a, a, None], [b, None, None]])
    assert both.tolist() == [2.0, 4.0] and one.tolist() == [1.0, 2.0] and none is None


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        params = [torch.nn.Parameter(torch.zeros(shape)) for shape in SHAPES + [(2,)]]  # the last: nobody's
        for p, g in zip(params, rank_gradients(rank) + [None]):
            p.grad = g
        average_gradients(params)
        torch.save([p.grad for p in params], os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_average_gradients_on_two_gloo_ranks(tmp_path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_worker, args=(port, str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    expected = mean_over_holders([rank_gradients(0) + [None], rank_gradients(1) + [None]])
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert len(got) == len(expected)
        for g, e in zip(got, expected):
            assert (g is None) == (e is None)
            if e is not None:
                torch.testing.assert_close(g, e, rtol=1e-6, atol=1e-7)
    assert expected[0] is not None and expected[2] is not None  # a tensor only rank 1 held reached rank 0 too
