"""The compiled engine's step on a GPU: the same `StaticDecoderStep`, captured as CUDA graphs.

On a GPU a decoder step of the small model is ~250 kernels, each launched from Python: at batch 1 a
search spends its time launching them, not computing (3-6 ms a step on an H100 for either qkv or
Hugging Face, and bf16 no faster than fp32: benchmarks/README.md, "On a GPU"). A CUDA graph records
the step's kernels once and replays them with one call. What a graph needs, the static step already
has: fixed shapes for a given number of rows, cache capacity and source length (`StaticCache`), and
no reads of GPU values on the host.

`StepGraphs` keeps one graph per such shape (rows, capacity, source slots; the capacity doubles, the
source is padded to a multiple of 8, so a few graphs serve a whole server). A graph reads its inputs
from buffers of its own and writes its outputs to buffers of its own: each call copies the step's
inputs in (a handful of copies, the cache's keys and values among them), replays, and hands out
copies of the outputs that the search keeps (the cache's new keys and values it reads at once).
Recording a graph runs the step three times (twice to warm up on a side stream, once captured): a
few eager steps, no compiler. All graphs share one memory pool and replay one at a time.

`GraphedEngine` is `CompiledEngine` with these graphs in place of AOTInductor's programs: beam 5 on
one sentence, greedy on up to 32 sentences (in buckets), the searches unchanged; the encoder, beams on
many sentences and anything it cannot capture take the eager engine (said once). `qkv translate
--compile` and `Translator(compile=True)` take it for an fp32 model on a GPU.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from qkv.inference.compiled import CompiledEngine
from qkv.inference.engine import DecodingEngine
from qkv.inference.static_step import StaticDecoderStep
from qkv.inference.step_programs import BEAMS
from qkv.model import Transformer

# Graphs kept per step (of each kind, per number of rows): each holds its input and output buffers,
# a copy of the cache's keys and values among them (the base model at 32 rows, 512 slots and 256
# source slots: ~300 MB), and its share of the pool. Past that many shapes (a few source lengths at
# each capacity), the least recently used go, and are recorded again if they come back.
MAX_GRAPHS = 64

# (step, static inputs) -> (replay, static outputs): run the step once over the inputs' buffers, so
# that each call of `replay` computes it again from whatever those buffers hold into the same outputs.
Capture = Callable[[Callable[..., tuple[Tensor, ...]], tuple[Tensor, ...]], tuple[Callable, tuple]]


def capture_cuda_graph(step, inputs: tuple[Tensor, ...], pool=None) -> tuple[Callable, tuple]:
    """Record `step(*inputs)` as a CUDA graph (in `pool`, shared between graphs) on the inputs'
    GPU, whichever is current: warmed up twice on a side stream first, as PyTorch asks (lazy
    initialisations, cuBLAS's workspace), then captured on a stream of that GPU."""
    device = inputs[0].device
    with torch.cuda.device(device):
        current = torch.cuda.current_stream(device)
        side = torch.cuda.Stream(device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            for _ in range(2):
                step(*inputs)
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=pool, stream=torch.cuda.Stream(device)):
                outputs = step(*inputs)
        finally:  # a capture that fails leaves its stream current: the eager step runs after it
            torch.cuda.set_stream(current)
    return graph.replay, tuple(outputs)


def replayed_eagerly(step, inputs: tuple[Tensor, ...], pool=None) -> tuple[Callable, tuple]:
    """What a graph does with its buffers, on any device and without a graph: each replay runs
    `step` over the input buffers and copies its results into the same output buffers. It proves
    `StepGraphs`' bookkeeping where there is no GPU (the tests)."""
    results = step(*inputs)
    with torch.inference_mode(False):  # as a graph's buffers: written in and out of the mode
        outputs = tuple(result.clone() for result in results)

    def replay() -> None:
        for buffer, result in zip(outputs, step(*inputs), strict=True):
            buffer.copy_(result)

    return replay, outputs


class _Graph:
    """One recorded step: its input buffers, how to replay it, its output buffers."""

    def __init__(self, inputs: tuple[Tensor, ...], replay: Callable, outputs: tuple[Tensor, ...]):
        self.inputs, self.replay, self.outputs = inputs, replay, outputs


class StepGraphs:
    """A step's graphs, one per shape of its inputs, recorded at the first call with that shape.

    A call copies the inputs into the graph's buffers (those that are not already them), replays it,
    and returns its outputs: copies of the first ones (what the search keeps), the last `transient`
    as the graph's own buffers, valid until the next replay of any graph of the same `pool` (the
    cache copies them at once): graphs recorded later may take the memory of an earlier one's
    intermediate results for their outputs, which that one's replays overwrite."""

    def __init__(
        self,
        step: Callable[..., tuple[Tensor, ...]],
        transient: int = 0,
        capture: Capture = capture_cuda_graph,
        pool=None,
    ):
        self.step, self.transient, self.capture, self.pool = step, transient, capture, pool
        self.graphs: OrderedDict[tuple, _Graph] = OrderedDict()  # least recently used first
        self.recorded = 0  # graphs recorded so far (evicted ones included)

    def __call__(self, *arguments: Tensor) -> tuple[Tensor, ...]:
        shape = tuple((tuple(a.shape), a.dtype, a.device) for a in arguments)
        graph = self.graphs.get(shape)
        if graph is None:
            graph = self.graphs[shape] = self._record(arguments)
            while len(self.graphs) > MAX_GRAPHS:
                self.graphs.popitem(last=False)
        else:
            self.graphs.move_to_end(shape)
            for buffer, argument in zip(graph.inputs, arguments, strict=True):
                if buffer.data_ptr() != argument.data_ptr():
                    buffer.copy_(argument)
        graph.replay()
        kept = len(graph.outputs) - self.transient
        return (*(output.clone() for output in graph.outputs[:kept]), *graph.outputs[kept:])

    def _record(self, arguments: tuple[Tensor, ...]) -> _Graph:
        with torch.inference_mode(False):  # buffers written in and out of inference mode
            inputs = tuple(argument.clone() for argument in arguments)
        replay, outputs = self.capture(self.step, inputs, self.pool)
        self.recorded += 1
        return _Graph(inputs, replay, outputs)


def graphs_unavailable(model: Transformer) -> str | None:
    """None if CUDA graphs can serve `model` here, else why not (one line)."""
    weight = model.output.weight
    if weight.device.type != "cuda":
        return f"CUDA graphs need a model on a GPU, not on {weight.device}"
    if weight.dtype != torch.float32:
        return f"the step as CUDA graphs runs fp32 models, not {str(weight.dtype)[6:]}"
    return None


class GraphedEngine(CompiledEngine):
    """`CompiledEngine` whose step replays CUDA graphs (`StepGraphs`) instead of AOTInductor's
    programs. `capture` records a step (default `capture_cuda_graph`; `replayed_eagerly` keeps the
    same buffers on any device, with no graph); `warn` says once why graphs are not taken, if not."""

    MAKES = "capture {} as a CUDA graph"
    # A graph computes on copies of its inputs (`StepGraphs`): the cache copies the keys and values
    # from its outputs
    STEPS_WRITE_CACHE = False
    NATIVE_CANDIDATES = False  # qkv's operators run on the CPU

    def __init__(
        self,
        model: Transformer,
        warn=warnings.warn,
        cache_dir: str | Path | None = None,
        say=None,
        capture: Capture | None = None,
    ):
        self.capture = capture or capture_cuda_graph
        super().__init__(model, warn, cache_dir, say)
        self.compiles_beams = False  # beams on many sentences: the eager step's shared cache
        real_graphs = self.capture is capture_cuda_graph and self.unavailable is None
        self.pool = torch.cuda.graph_pool_handle() if real_graphs else None  # shared by all

    def why_unavailable(self, model: Transformer) -> str | None:
        if self.capture is capture_cuda_graph:
            return graphs_unavailable(model)
        return None

    def program(self, arguments: tuple, kind: int = BEAMS) -> StepGraphs:
        """The graphs for this number of rows of this `kind` of step (`step_programs.BEAMS`, ...)."""
        rows = arguments[0].size(0)
        if (rows, kind) not in self.programs:
            step: StaticDecoderStep = self.step_module(kind)
            transient = len(self.decoder)  # each layer's projection, which the cache copies
            self.programs[rows, kind] = StepGraphs(step, transient, self.capture, self.pool)
        return self.programs[rows, kind]

    def many_rows_gain(self) -> bool:
        """Whatever the model's size: a graph replays its kernels at any size (the CPU's limits
        there are about its caches and vectors)."""
        return True

    def encode(self, src_ids: Tensor) -> tuple[Tensor, Tensor]:
        """The eager encoder: one call a sentence, its kernels few and large."""
        return DecodingEngine.encode(self, src_ids)
