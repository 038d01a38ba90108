"""Single-stream views: a one-stream copy of a multi-stream module whose parameters ARE stream `s`'s tensors.

Training runs one stream per step (spec 1.4: only stream `s`'s weights, no repetition over streams, no
reduction). A view is built once per stream from the same module classes with `streams = 1`; its
`StreamParameters` entries are then replaced by the multi-stream module's `Parameter` objects of stream `s`, and
its buffers by the multi-stream module's buffers. Gradients of a view land in the original parameters' `.grad`,
optimiser steps on the originals are seen by the view, and nothing is copied.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from torch import nn

from fnn_model.wconv import StreamParameters

M = TypeVar("M", bound=nn.Module)


def stream_view(multi: nn.Module, build_single: Callable[[], M], stream: int) -> M:
    """A one-stream module built by `build_single()` that shares stream `stream`'s parameters of `multi`.

    `build_single` must build the same module tree as `multi` with one stream (same names). A `StreamParameters`
    of `multi` with one entry (a module that is not per stream) is shared whole. Every parameter of the view is
    a parameter of `multi`; a mismatch in names or shapes raises `ValueError`.
    """
    single = build_single()
    sources = dict(multi.named_modules())
    for name, module in single.named_modules():
        if not isinstance(module, StreamParameters):
            continue
        source = sources.get(name)
        if not isinstance(source, StreamParameters) or len(module) != 1:
            raise ValueError(f"stream_view: {name!r} is not a per-stream parameter list in both modules")
        shared = source[stream if len(source) > 1 else 0]
        if shared.shape != module[0].shape:
            raise ValueError(f"stream_view: {name!r} has shape {list(module[0].shape)}, stream {stream} of the "
                             f"original {list(shared.shape)}")
        module[0] = shared
    buffers = dict(multi.named_buffers())
    for name, buffer in list(single.named_buffers()):
        owner, _, leaf = name.rpartition(".")
        setattr(single.get_submodule(owner), leaf, buffers[name])
    originals = {id(p) for p in multi.parameters()}
    strays = [n for n, p in single.named_parameters() if id(p) not in originals]
    if strays:
        raise ValueError(f"stream_view: parameter(s) {strays[:3]} of the view are not per-stream lists")
    return single.train(multi.training)
