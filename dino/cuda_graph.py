"""``--cuda-graph``: the training step's forward, losses, center update and backward replayed from one CUDA graph
(the default for ``--kernels fused`` in one CUDA process; see :func:`dino.train.uses_cuda_graph`).

Eager, a ViT-S/16 step on an H200 spends more time launching kernels from Python than the GPU spends running them;
replayed from a graph, the same kernels run on the same tensors with one launch. The maths is the step's own: the
graph holds exactly the kernels the eager step launches, and the random draws (stochastic depth) come from the same
generator, which a capture registers so that every replay draws new numbers.

A graph holds fixed tensors: the crops are copied into static inputs before each replay, the outputs and the
gradients are the graph's own tensors, overwritten by the next replay. Host floats baked into the kernels (the
teacher temperature, the centering) are the capture's key: a new key captures a new graph, once per epoch during
the teacher-temperature warm-up. The first step of a process runs eagerly, since lazy initialisation (cuBLAS
workspaces, Triton's compiles, our derived-tensor caches) must not happen under capture. The graph's memory pool is
held between steps: on ViT-S/16 (B = 64, 2 + 10 crops, bf16) the run's peak went from 7.7 to 8.1 GB.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Hashable, Sequence
from typing import TypeVar

import torch

Outputs = TypeVar("Outputs")


class GraphedStep:
    """Runs ``step(crops)`` (forward, losses, backward: it sets the parameters' ``.grad``) eagerly once, then from a
    CUDA graph captured per ``key``. After each call every parameter's ``.grad`` is the step's gradient (a graph
    tensor: the optimizer may scale it in place, or set it to None, until the next call restores it).

    A step that cannot be captured (an op that reads a value back to the host, say) raises a RuntimeError, or with
    ``fallback`` warns once and runs eagerly from then on."""

    def __init__(self, params: Sequence[torch.nn.Parameter], fallback: bool) -> None:
        self.params = list(params)
        self.fallback = fallback
        self.key: Hashable | None = None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.crops: list[torch.Tensor] = []
        self.outputs: object = None
        self.grads: list[torch.Tensor | None] = []
        self.warm = self.failed = False

    def __call__(self, crops: Sequence[torch.Tensor], key: Hashable,
                 step: Callable[[list[torch.Tensor]], Outputs]) -> Outputs:
        if self.failed or not self.warm:
            self.warm = True
            return self._eager(crops, step)
        if self.graph is None or key != self.key or _layout(crops) != _layout(self.crops):
            try:
                self._capture(crops, key, step)
            except RuntimeError as err:
                self.graph = self.outputs = None
                self.grads = []
                if not self.fallback:
                    raise RuntimeError(f"cuda_graph=on: the training step could not be captured in a CUDA graph "
                                       f"({err}); use --cuda-graph off") from err
                warnings.warn(f"cuda_graph=auto: the training step could not be captured in a CUDA graph ({err}); "
                              "it runs eagerly from now on (--cuda-graph off skips the attempt)", RuntimeWarning,
                              stacklevel=3)
                self.failed = True
                return self._eager(crops, step)
        for static, crop in zip(self.crops, crops):
            static.copy_(crop)
        self.graph.replay()
        for p, grad in zip(self.params, self.grads):
            p.grad = grad
        return self.outputs

    def _eager(self, crops: Sequence[torch.Tensor], step: Callable[[list[torch.Tensor]], Outputs]) -> Outputs:
        self._clear_grads()
        return step(list(crops))

    def _clear_grads(self) -> None:
        for p in self.params:
            p.grad = None

    def _capture(self, crops: Sequence[torch.Tensor], key: Hashable,
                 step: Callable[[list[torch.Tensor]], Outputs]) -> None:
        # The previous graph's memory pool goes first; with no gradient the capture's backward allocates every
        # .grad in the new graph's pool (and replays write them, instead of accumulating into older tensors).
        self.graph = self.outputs = None
        self.grads = []
        self._clear_grads()
        self.crops = [torch.empty_like(c) for c in crops]
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.outputs = step(self.crops)
        self.grads = [p.grad for p in self.params]
        self.graph, self.key = graph, key


def _layout(tensors: Sequence[torch.Tensor]) -> list[tuple]:
    return [(t.shape, t.dtype, t.device) for t in tensors]
