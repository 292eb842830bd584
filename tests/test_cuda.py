"""The CUDA paths: fused attention, the model, the search, bf16 autocast, torch.compile and the commands
on a GPU agree with the CPU paths the other tests prove correct. Skipped where torch sees no GPU (CI);
run them on a machine with one: `pytest tests/test_cuda.py`."""

import json

import pytest
import torch
from torch import nn

import qkv
from conftest import qkv_env
from qkv.search import beam_search, greedy_search
from test_attention import copy_from_torch
from test_search import random_model, random_sources

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no GPU")

CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def exact_fp32_matmuls():
    """TF32 would round fp32 products to 10 mantissa bits; the comparisons here are with fp32 on CPU."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("masking", ["key_padding", "causal"])
def test_fused_attention_on_cuda_equals_torch_multihead_attention(dtype, masking):
    """On CUDA, qkv's attention runs PyTorch's fused kernels (flash / memory-efficient in bf16)."""
    torch.manual_seed(0)
    reference = nn.MultiheadAttention(64, 4, batch_first=True).to(CUDA, dtype).eval()
    ours = copy_from_torch(reference)  # on the reference's device, in its dtype
    x = torch.randn(3, 9, 64, device=CUDA, dtype=dtype)
    if masking == "causal":
        out, _ = ours(x, causal=True)
        causal = nn.Transformer.generate_square_subsequent_mask(9, device=CUDA, dtype=torch.bool)
        expected, _ = reference(x, x, x, attn_mask=causal, need_weights=False, is_causal=True)
    else:
        keep = torch.arange(9, device=CUDA)[None, :] < torch.tensor([9, 5, 2], device=CUDA)[:, None]
        out, _ = ours(x, mask=keep[:, None, None, :])
        expected, _ = reference(x, x, x, key_padding_mask=~keep, need_weights=False)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out, expected, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("norm_first", [False, True])
def test_model_on_cuda_equals_model_on_cpu(norm_first):
    model = random_model(norm_first=norm_first)
    src = random_sources([7, 4, 9])
    tgt = random_sources([5, 8, 3], vocab=30, seed=1)
    with torch.no_grad():
        expected = model(src, tgt)
        got = model.to(CUDA)(src.to(CUDA), tgt.to(CUDA)).cpu()
    # Padded positions differ only where every key is masked; compare the real ones.
    real = tgt != 0
    torch.testing.assert_close(got[real], expected[real], atol=1e-4, rtol=1e-4)


def test_bf16_autocast_on_cuda_stays_close_to_fp32():
    model = random_model().to(CUDA)
    src, tgt = (
        random_sources([7, 4, 9]).to(CUDA),
        random_sources([5, 8, 3], vocab=30, seed=1).to(CUDA),
    )
    with torch.no_grad():
        fp32 = model(src, tgt).float().log_softmax(-1)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            bf16 = model(src, tgt).float().log_softmax(-1)
    real = (tgt != 0).cpu()
    assert (bf16 - fp32).abs().cpu()[real].max() < 0.1


@pytest.mark.parametrize("search", ["greedy", "beam"])
def test_search_on_cuda_equals_search_on_cpu(search):
    model = random_model(seed=3)
    src = random_sources([6, 3, 9, 5])
    run = (
        (lambda m, s: greedy_search(m, s, max_len=12))
        if search == "greedy"
        else (lambda m, s: beam_search(m, s, beam_size=4, max_len=12, n_best=2))
    )
    ids, scores = run(model, src)
    cuda_ids, cuda_scores = run(model.to(CUDA), src.to(CUDA))
    assert torch.equal(cuda_ids.cpu(), ids)
    torch.testing.assert_close(cuda_scores.cpu(), scores, atol=1e-4, rtol=1e-4)


def test_compiled_model_on_cuda_equals_eager():
    model = random_model().to(CUDA)
    src, tgt = (
        random_sources([7, 4, 9]).to(CUDA),
        random_sources([5, 8, 3], vocab=30, seed=1).to(CUDA),
    )
    compiled = torch.compile(model)
    with torch.no_grad():
        expected = model(src, tgt)
        got = compiled(src, tgt)
    real = tgt != 0
    torch.testing.assert_close(got[real], expected[real], atol=1e-4, rtol=1e-4)


def test_translate_on_cuda_gives_the_cpu_translations(toy_run, run_qkv):
    lines = "a b c\np o n m\n\ne f g h i\n"
    cpu = run_qkv("translate", toy_run, "--device", "cpu", input=lines)
    gpu = run_qkv("translate", toy_run, "--device", "cuda", input=lines)
    assert cpu.returncode == 0 and gpu.returncode == 0, gpu.stderr[-2000:]
    assert gpu.stdout == cpu.stdout
    assert len(gpu.stdout.splitlines()) == 4 and gpu.stdout.splitlines()[2] == ""


@pytest.mark.parametrize("compile_model", [False, True])
def test_training_on_cuda_in_bf16_learns_and_resumes_on_cpu(compile_model, run_qkv, tmp_path):
    """`qkv train` on the GPU with bf16 autocast (and torch.compile): the loss falls, and its checkpoint
    loads on a machine without a GPU and translates there as on the GPU."""
    out = tmp_path / "run"
    overrides = [
        "model.preset=tiny",
        "model.dropout=0.0",
        "data.dataset='synthetic'",
        "train.device='cuda'",
        "train.precision='bf16'",
        f"train.compile={str(compile_model).lower()}",
        "train.max_steps=60",
        "train.max_tokens=2048",
        "train.warmup_steps=40",
        "train.log_every=10",
        "eval.every_steps=60",
        "eval.max_sentences=16",
    ]
    trained = run_qkv("train", "demo", "--out", out, *(a for o in overrides for a in ("--set", o)))
    assert trained.returncode == 0, trained.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "split" not in r and "event" not in r]
    assert losses[-1] < 0.7 * losses[0]
    cpu = run_qkv("translate", out, "--device", "cpu", input="one two three\n", env=qkv_env())
    assert cpu.returncode == 0 and len(cpu.stdout.splitlines()) == 1, cpu.stderr[-2000:]
    sentences = ["one two three", "twenty one", "the fifth of june"]
    on_cpu, on_gpu = qkv.load(out, device="cpu"), qkv.load(out, device="cuda")
    assert on_cpu.translate(sentences, beam=4) == on_gpu.translate(sentences, beam=4)


def test_a_run_on_cuda_resumes_on_cuda(run_qkv, tmp_path):
    """Resuming loads the checkpoint onto the GPU, random number generator states included."""
    out = tmp_path / "run"
    common = [
        "--set",
        "train.device='cuda'",
        "--set",
        "train.save_every=5",
        "--set",
        "eval.every_steps=0",
    ]
    first = run_qkv("train", "demo", "--out", out, "--set", "train.max_steps=5", *common)
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = run_qkv(
        "train",
        "demo",
        "--out",
        out,
        "--resume",
        "--set",
        "train.max_steps=8",
        *common,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    steps = [
        json.loads(line).get("step") for line in (out / "metrics.jsonl").read_text().splitlines()
    ]
    assert max(steps) == 8


def test_the_compiled_step_on_cuda_replays_cuda_graphs_with_the_eager_engines_results():
    """`GraphedEngine` (`qkv translate --compile --device cuda`): greedy search on sentences that end
    at different steps and beam 5 on one sentence give the eager engine's ids and scores on the
    GPU, each shape recorded once."""
    from qkv.inference import prepare_for_decoding
    from qkv.inference.cuda_graphs import GraphedEngine
    from test_compiled import assert_same_beams, assert_same_greedy

    model = random_model(seed=2).to(CUDA)
    said = []
    engine, reference = GraphedEngine(model, warn=said.append), prepare_for_decoding(model)
    assert engine.unavailable is None
    src = random_sources([3, 9, 1, 6, 12, 4, 8], seed=8).to(CUDA)
    assert_same_greedy(engine, reference, src)
    assert_same_beams(engine, reference, src[:1], beam_size=5, max_len=25)
    recorded = {key: graphs.recorded for key, graphs in engine.programs.items()}
    assert recorded and all(count > 0 for count in recorded.values())
    assert_same_greedy(engine, reference, src)
    assert_same_beams(engine, reference, src[:1], beam_size=5, max_len=25)
    assert recorded == {key: graphs.recorded for key, graphs in engine.programs.items()}
    assert said == []  # nothing fell back to the eager step


def test_translate_compile_on_cuda_takes_the_graphs_in_fp32(toy_run, run_qkv):
    from qkv.inference.cuda_graphs import GraphedEngine
    from qkv.translate import Translator

    translator = Translator.load(toy_run, device="cuda", precision="auto", compile=True)
    engine = translator.engine()
    assert translator.precision == "fp32" and isinstance(engine, GraphedEngine)
    plain = Translator.load(toy_run, device="cuda", precision="fp32")
    lines = ["a b c", "p o n m", "e f g h i"]
    # Greedy on the three together, beam 5 on each alone: what the graphs take (not 15 rows).
    assert translator.translate(lines, beam=1) == plain.translate(lines, beam=1)
    for line in lines:
        assert translator.translate([line]) == plain.translate([line])
    assert {(3, True), (5, False)} <= set(engine.programs)
    assert all(graphs.recorded > 0 for graphs in engine.programs.values())
    text = "\n".join(lines) + "\n"
    options = ("--device", "cuda", "--precision", "fp32", "--beam", "1")
    graphed = run_qkv("translate", toy_run, *options, "--compile", input=text)
    eager = run_qkv("translate", toy_run, *options, input=text)
    assert graphed.returncode == 0, graphed.stderr[-2000:]
    assert graphed.stdout == eager.stdout and "eager" not in graphed.stderr


def test_a_step_that_cannot_be_captured_leaves_the_gpus_stream_as_it_was():
    """A step that reads a GPU value on the host cannot be a graph: the capture fails, and the
    eager step that runs instead runs on the stream that was current before."""
    from qkv.inference.cuda_graphs import capture_cuda_graph

    def reads_on_the_host(x):
        return (x * x.sum().item(),)

    x = torch.ones(3, device=CUDA)
    before = torch.cuda.current_stream()
    with pytest.raises(RuntimeError):
        capture_cuda_graph(reads_on_the_host, (x,))
    assert torch.cuda.current_stream() == before
    assert reads_on_the_host(x)[0].tolist() == [3.0, 3.0, 3.0]
