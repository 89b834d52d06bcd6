"""The compiled training step and CUDA-graph inference (engine only: nothing here is in the paper).

* :func:`loss_step` -> ``step(images, input_ids, attention_mask, erased_ids, target, delta)``:
  forward + :func:`dmmi.losses.dmmi_loss` under the mode's autocast, returning the
  :class:`~dmmi.losses.LossTerms`; the caller runs ``terms.total.backward()``. With ``compile``
  it is one ``torch.compile(fullgraph=True, dynamic=False)`` graph: no graph break, static shapes
  (tokens padded to ``model.max_tokens``; one compilation per input shape), backward compiled by
  AOTAutograd. ``train.compile`` makes it the trainer's step.
* :class:`GraphedForward`: eval-mode ``model(images, input_ids, attention_mask).logits`` replayed
  from a CUDA graph, one captured per input shape (warmed up once, then captured); on other
  devices it calls the model as it is. ``Predictor(cuda_graphs=True)`` uses it.

The model's hot path has no data-dependent Python branch and no host sync on a GPU: the checks
that read tensor values (an empty attention mask, the object prior's early stop) run eager on
host tensors only (``torch.compiler.is_compiling()`` and the device type gate them).
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from typing import Callable, Optional

import torch
from torch import nn

from dmmi.engine.fastpath import autocast, autocast_dtype
from dmmi.losses import LossTerms, dmmi_loss

__all__ = ["loss_step", "compile_options", "GraphedForward"]


def compile_options(compile: bool | str, backend: Optional[str] = None) -> dict:
    """``True`` / ``"default"`` / a torch.compile mode (and a backend: None = inductor) -> keyword
    arguments of ``torch.compile``: one full graph, static shapes."""
    mode = compile if isinstance(compile, str) and compile != "default" else None
    return {"fullgraph": True, "dynamic": False, **({"mode": mode} if mode else {}),
            **({"backend": backend} if backend else {})}


def loss_step(model: nn.Module, loss_cfg, device, *, fast: bool, cpu_bf16: bool = False, compat: bool = False,
              compile: bool | str = False, backend: Optional[str] = None) -> Callable[..., LossTerms]:
    """-> ``step(images (B, 3, H, W), input_ids, attention_mask, erased_ids (B, L), target (B, H, W),
    delta (B,)) -> LossTerms`` (fp32 terms); compiled as one full graph when ``compile`` (True or a
    torch.compile mode; ``backend``: torch.compile's, None = inductor)."""

    if compile and isinstance(model, nn.parallel.DistributedDataParallel):
        # DDP's own forward (its hooks, its logging) cannot be traced inside a function: compile the
        # wrapped module (dynamo's DDPOptimizer cuts the graph at the gradient buckets), the loss eager
        model = torch.compile(model, **{**compile_options(compile, backend), "fullgraph": False})
        compile = False

    def step(images, input_ids, attention_mask, erased_ids, target, delta) -> LossTerms:
        with autocast(device, fast, cpu_bf16=cpu_bf16):
            out = model(images, input_ids, attention_mask, erased_ids)
        return dmmi_loss(out, target, attention_mask, delta, loss_cfg, compat=compat)  # fp32 whatever the autocast

    return torch.compile(step, **compile_options(compile, backend)) if compile else step


class _Captured:
    """One CUDA graph with its static input buffers and its static output."""

    def __init__(self, graph, inputs: tuple, logits: torch.Tensor):
        self.graph, self.inputs, self.logits = graph, inputs, logits


class GraphedForward:
    """Eval-mode ``model(images, input_ids, attention_mask).logits`` from CUDA graphs.

    call(images (B, 3, H, W), input_ids (B, L), attention_mask (B, L)) -> logits (B, 2, H, W), a
    copy the caller owns. A shape (or dtype) not seen before is warmed up with ``warmup`` eager calls
    on a side stream (cuDNN autotuning, lazy initialisation, the model's shape caches), then
    captured once into static input buffers; each later call copies its inputs in and replays.
    At most ``max_graphs`` graphs are kept, each with its own memory pool (least recently used go
    first). In fast mode the capture runs under bf16 autocast, as :func:`~dmmi.engine.fastpath.autocast`.
    Off CUDA (or ``enabled=False``) it calls the model eagerly under the mode's autocast. Moving the
    model drops the graphs (checked on each call), as :meth:`reset` does; new weights loaded in place
    (``load_state_dict``) are replayed as they are.
    """

    def __init__(self, model: nn.Module, device, *, fast: bool, warmup: int = 3, max_graphs: int = 8,
                 enabled: bool = True):
        self.model, self.fast = model, fast
        self.device = device if isinstance(device, torch.device) else torch.device(device)
        self.active = bool(enabled) and self.device.type == "cuda"
        self.warmup, self.max_graphs = warmup, max_graphs
        self._graphs: OrderedDict = OrderedDict()  # key -> _Captured
        self._params = list(model.parameters())  # .to() / .cuda() change their addresses in place
        self._weights: Optional[tuple] = None  # (first, last) parameter address the graphs were captured with
        self.captures = 0

    def reset(self) -> None:
        self._graphs.clear()
        self._weights = None

    def _eager(self, images, input_ids, attention_mask) -> torch.Tensor:
        dtype = autocast_dtype(self.device, self.fast)
        amp = (torch.autocast(self.device.type, dtype=dtype, cache_enabled=False) if dtype is not None
               else contextlib.nullcontext())
        with torch.no_grad(), amp:  # no weight-cast cache: its tensors would outlive a capture
            return self.model(images, input_ids, attention_mask).logits

    def __call__(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return self._eager(images, input_ids, attention_mask)
        # normal (not inference-mode) tensors, so that callers under no_grad and inference_mode share the graphs
        with torch.inference_mode(False), torch.no_grad():
            return self._replay(images, input_ids, attention_mask)

    def _replay(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        weights = (self._params[0].data_ptr(), self._params[-1].data_ptr()) if self._params else ()
        if weights != self._weights:  # a moved model: the captured addresses are stale
            self.reset()
            self._weights = weights
        key = tuple((tuple(t.shape), t.dtype) for t in (images, input_ids, attention_mask))
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._capture(images, input_ids, attention_mask)
            self._graphs[key] = entry
            while len(self._graphs) > self.max_graphs:
                self._graphs.popitem(last=False)
        self._graphs.move_to_end(key)
        for static, given in zip(entry.inputs, (images, input_ids, attention_mask)):
            static.copy_(given, non_blocking=True)
        entry.graph.replay()
        return entry.logits.clone()

    def _capture(self, images, input_ids, attention_mask) -> _Captured:
        inputs = tuple(torch.empty_like(t, memory_format=torch.preserve_format).copy_(t)
                       for t in (images, input_ids, attention_mask))  # static buffers (an expanded view: dense)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(self.warmup):
                self._eager(*inputs)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = self._eager(*inputs)
        self.captures += 1
        return _Captured(graph, inputs, logits)
