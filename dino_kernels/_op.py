"""The glue every op shares: one registered op with its fake and its autograd formula, and a cheap eager path.

:class:`KernelOp` registers ``impl`` (the op's dispatch function: it picks the implementation once and calls a
launcher) as the custom op ``dino_kernels::<name>`` for every device, with ``fake`` for tracing and, when given,
``setup_context``/``backward`` as its autograd formula. Calling the ``KernelOp``:

- while a graph is traced (``torch.compile``, ``torch.export``, AOTAutograd) calls the registered op, which the
  tracer sees as one opaque node with a fake;
- eagerly runs the same ``impl``, ``setup_context`` and ``backward`` through one generic ``autograd.Function``,
  skipping the custom-op wrapper. That wrapper costs about 10 µs of host time per call more than an
  ``autograd.Function`` (``benchmarks/bench_dispatch.py``), which at DINO's shapes is as long as a kernel.

Both paths bump the version counter of the arguments named in ``mutates_args``, as any in-place op does, so that
autograd refuses a saved tensor that was modified since (e.g. a second backward through a rescaled gradient).

``backward(ctx, *grads)`` sees the same ``ctx`` on both paths: ``ctx.needs_input_grad`` has one entry per op
argument, a list of bools for a ``list[Tensor]`` argument; a ``list[Tensor]`` result's gradients come as one list.
``setup_context`` of an op with list arguments must not index ``ctx.needs_input_grad``: the registered op's sees it
flat, one entry per tensor (``requires_grad`` of the input says the same).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch._subclasses.fake_tensor import is_fake
from torch.fx.experimental.proxy_tensor import get_proxy_mode

# Tensors of exactly these types are real, never a tracer's stand-in: checking the type first spares `is_fake`
# (about 1.5 µs a call) on the eager path.
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def tracing(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` (and so every tensor of the same call) is being traced (torch.compile, torch.export,
    AOTAutograd) rather than computed."""
    return (torch.compiler.is_compiling() or get_proxy_mode() is not None
            or (type(tensor) not in _PLAIN_TENSORS and is_fake(tensor)))


class KernelOp:
    """``dino_kernels::<name>``: ``impl`` registered for all devices, its fake and its autograd formula."""

    def __init__(self, name: str, impl: Callable, *, fake: Callable, mutates_args: tuple[str, ...] = (),
                 setup_context: Callable | None = None, backward: Callable | None = None) -> None:
        self.impl, self.setup_context, self.backward = impl, setup_context, backward
        self.mutated = [i for i, name in enumerate(inspect.signature(impl).parameters) if name in mutates_args]
        self.op = torch.library.custom_op(f"dino_kernels::{name}", impl, mutates_args=mutates_args)
        # A list[Tensor] result leaves the eager autograd.Function as a tuple and is made a list again.
        returns = self.op._opoverload._schema.returns
        self.returns_list = len(returns) == 1 and isinstance(returns[0].type, torch.ListType)
        self.op.register_fake(fake)
        if backward is not None:
            self.op.register_autograd(backward, setup_context=setup_context)

    def __call__(self, *args: Any) -> Any:
        lists = [a for a in args if isinstance(a, list)]
        first = next(t for a in args for t in (a[:1] if isinstance(a, list) else (a,)) if isinstance(t, torch.Tensor))
        if tracing(first):
            return self.op(*args)
        if self.backward is not None and torch.is_grad_enabled() and any(
                isinstance(t, torch.Tensor) and t.requires_grad
                for a in args for t in (a if isinstance(a, list) else (a,))):
            if lists:  # a list argument is passed as its length and its tensors, which autograd.Function then sees
                sizes = [len(a) if isinstance(a, list) else None for a in args]
                flat = [t for a in args for t in (a if isinstance(a, list) else (a,))]
                output = _Eager.apply(self, sizes, *flat)
            else:
                output = _Eager.apply(self, None, *args)
            if self.returns_list:
                output = list(output)
        else:
            output = self.impl(*args)
        for i in self.mutated:
            torch.autograd.graph.increment_version(args[i])  # a tensor or a list of them
        return output


def _regroup(flat: Sequence[Any], sizes: Sequence[int | None] | None) -> list[Any]:
    """Undo the flattening of ``KernelOp.__call__``: list arguments become lists again (``sizes`` None: no lists)."""
    if sizes is None:
        return list(flat)
    grouped, i = [], 0
    for size in sizes:
        grouped.append(flat[i] if size is None else list(flat[i:i + size]))
        i += 1 if size is None else size
    return grouped


class _Eager(torch.autograd.Function):
    """A KernelOp's formulas without the custom-op wrapper."""

    @staticmethod
    def forward(ctx, op: KernelOp, sizes: list[int | None] | None, *flat: Any) -> Any:
        args = _regroup(flat, sizes)
        output = op.impl(*args)
        ctx.op, ctx.sizes = op, sizes
        needs = ctx.needs_input_grad
        ctx.needs_input_grad = tuple(_regroup(needs[2:], sizes))
        op.setup_context(ctx, args, output)
        ctx.needs_input_grad = needs
        return tuple(output) if op.returns_list else output

    @staticmethod
    def backward(ctx, *grads: Any) -> Any:
        needs = ctx.needs_input_grad
        ctx.needs_input_grad = tuple(_regroup(needs[2:], ctx.sizes))
        try:
            # A list result's gradients reach the formula as one list, as the registered op passes them.
            result = ctx.op.backward(ctx, *((list(grads),) if ctx.op.returns_list else grads))
        finally:
            ctx.needs_input_grad = needs
        result = result if isinstance(result, tuple) else (result,)
        if ctx.sizes is None:
            return None, None, *result
        flat = []
        for grad, size in zip(result, ctx.sizes):
            flat.extend((grad,) if size is None else (grad if grad is not None else [None] * size))
        return None, None, *flat
