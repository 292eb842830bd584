"""The compiled step as CUDA graphs (`qkv.inference.cuda_graphs`), where no GPU is needed: the graphs'
buffers, with each replay run eagerly over them (`replayed_eagerly`), and a whole search through
`GraphedEngine` that way. tests/test_cuda.py records real graphs on a GPU."""

from __future__ import annotations

import pytest
import torch

from qkv.inference import cuda_graphs, prepare_for_decoding
from qkv.inference.cuda_graphs import GraphedEngine, StepGraphs, graphs_unavailable
from qkv.inference.static_cache import StaticCache
from qkv.search import beam_search, greedy_search
from test_compiled import assert_same_beams, assert_same_greedy
from test_search import random_model, random_sources


def sum_and_double(a, b):
    return a + b, a * 2, b - 1


def test_a_graph_is_recorded_once_per_shape_and_replays_the_new_inputs():
    graphs = StepGraphs(sum_and_double, capture=cuda_graphs.replayed_eagerly)
    a, b = torch.arange(3.0), torch.ones(3)
    total, double, less = graphs(a, b)
    assert graphs.recorded == 1
    torch.testing.assert_close(total, a + b)
    # The same shapes: no new graph, the new values copied into its buffers.
    total, double, less = graphs(a * 10, b * 3)
    assert graphs.recorded == 1
    torch.testing.assert_close(total, a * 10 + b * 3)
    torch.testing.assert_close(double, a * 20)
    torch.testing.assert_close(less, b * 3 - 1)
    # Another shape: a graph of its own; the first still answers for its own.
    graphs(torch.zeros(4), torch.zeros(4))
    assert graphs.recorded == 2 and len(graphs.graphs) == 2
    torch.testing.assert_close(graphs(a, b)[0], a + b)
    assert graphs.recorded == 2


def test_what_the_search_keeps_is_a_copy_and_only_the_transient_outputs_are_the_buffers():
    graphs = StepGraphs(sum_and_double, transient=1, capture=cuda_graphs.replayed_eagerly)
    a, b = torch.arange(3.0), torch.ones(3)
    kept_total, kept_double, transient = graphs(a, b)
    graph = next(iter(graphs.graphs.values()))
    assert transient is graph.outputs[2]
    assert kept_total.data_ptr() != graph.outputs[0].data_ptr()
    graphs(a + 100, b + 100)  # the next replay overwrites the buffers, not what was handed out
    torch.testing.assert_close(kept_total, a + b)
    torch.testing.assert_close(kept_double, a * 2)
    torch.testing.assert_close(transient, b + 99)


def test_an_input_that_is_already_the_graphs_buffer_is_not_copied_and_the_oldest_graph_goes(
    monkeypatch,
):
    monkeypatch.setattr(cuda_graphs, "MAX_GRAPHS", 2)
    graphs = StepGraphs(sum_and_double, capture=cuda_graphs.replayed_eagerly)
    graphs(torch.zeros(1), torch.zeros(1))
    buffers = next(iter(graphs.graphs.values())).inputs
    buffers[0].fill_(5.0)  # written in place, as a cache writes into what the graph reads
    assert graphs(buffers[0], torch.ones(1))[0].item() == 6.0
    graphs(torch.zeros(2), torch.zeros(2))
    graphs(torch.zeros(1), torch.zeros(1))  # used last: it stays
    graphs(torch.zeros(3), torch.zeros(3))  # the third shape: the least recently used goes
    assert [shape[0][0] for shape in graphs.graphs] == [(1,), (3,)]
    assert graphs.recorded == 3


def replayed(model, **options) -> GraphedEngine:
    return GraphedEngine(model, capture=cuda_graphs.replayed_eagerly, **options)


@pytest.mark.parametrize("overrides", [{}, {"norm_first": True}], ids=["post-LN", "pre-LN"])
def test_greedy_search_through_the_graphs_buffers_gives_the_eager_engines_ids_and_scores(
    overrides,
):
    model = random_model(seed=2, **overrides)
    engine, reference = replayed(model), prepare_for_decoding(model)
    src = random_sources([3, 9, 1, 6, 12, 4, 8], seed=8)  # 7 sentences: 8 rows, fewer as they end
    assert isinstance(engine.new_cache(max_beams=1, max_len=20, sentences=7), StaticCache)
    # One sentence over 40 positions: the cache grows (8, 16, 32, 40 slots), a graph for each.
    assert_same_greedy(engine, reference, src[:1, :7], max_len=40, min_len=40)
    graphs = engine.programs[1, True]
    assert sorted(shape[2][0][4] for shape in graphs.graphs) == [8, 16, 32, 40]
    assert_same_greedy(engine, reference, src)
    assert {rows for rows, greedy in engine.programs} == {1, 4, 8}
    # A second search of the same shapes records nothing new.
    recorded = {key: graphs.recorded for key, graphs in engine.programs.items()}
    assert_same_greedy(engine, reference, src)
    assert recorded == {key: graphs.recorded for key, graphs in engine.programs.items()}


def test_beam_search_on_one_sentence_through_the_graphs_buffers_gives_the_eager_beams():
    model = random_model(seed=4)
    engine, reference = replayed(model), prepare_for_decoding(model)
    src = random_sources([9], seed=3)
    assert_same_beams(engine, reference, src, beam_size=5, max_len=25)
    assert_same_beams(engine, reference, src, beam_size=3, max_len=25, n_best=3)
    # its rows from the first step (one row then, the rest repeating it)
    assert {rows for rows, greedy in engine.programs if not greedy} == {3, 5}
    # Beams on many sentences take the eager step's shared cache (no program of theirs here).
    many = random_sources([5, 8], seed=5)
    assert_same_beams(engine, reference, many, beam_size=5, max_len=15)
    assert not engine.compiles_beams


def test_without_a_gpu_it_says_why_once_and_decodes_as_the_eager_engine():
    model = random_model(seed=1)
    warnings = []
    engine = GraphedEngine(model, warn=warnings.append)
    assert graphs_unavailable(model) == "CUDA graphs need a model on a GPU, not on cpu"
    assert warnings == [
        "CUDA graphs need a model on a GPU, not on cpu: decoding takes the eager step"
    ]
    src = random_sources([6, 2], seed=1)
    ids, _ = greedy_search(engine, src, max_len=12)
    assert torch.equal(ids, greedy_search(prepare_for_decoding(model), src, max_len=12)[0])
    assert engine.programs == {} and len(warnings) == 1
    beam_ids, _ = beam_search(engine, src[:1], beam_size=5, max_len=12)
    assert beam_ids.shape[0] == 1


def test_a_step_that_cannot_be_recorded_says_so_once_and_runs_uncaptured():
    model = random_model(seed=3)
    warnings = []

    def refuses(step, inputs, pool=None):
        raise RuntimeError("operation not permitted when stream is capturing")

    engine = GraphedEngine(model, warn=warnings.append, capture=refuses)
    src = random_sources([5, 7], seed=2)
    assert_same_greedy(engine, prepare_for_decoding(model), src, max_len=15)
    assert warnings == [
        "PyTorch could not capture the decoder step as a CUDA graph here (RuntimeError: "
        "operation not permitted when stream is capturing): decoding takes the eager step"
    ]


def test_a_graphs_buffers_take_inputs_in_and_out_of_inference_mode():
    graphs = StepGraphs(sum_and_double, transient=3, capture=cuda_graphs.replayed_eagerly)
    with torch.inference_mode():
        graphs(torch.zeros(2), torch.zeros(2))
    with torch.no_grad():
        assert graphs(torch.ones(2), torch.ones(2))[0].tolist() == [2.0, 2.0]
