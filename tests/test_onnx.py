"""`qkv export --format onnx`: the encoder and decoder-step graphs compute what qkv's engine computes,
for shapes other than those traced, and `qkv translate DIR` runs qkv's own search on ONNX Runtime."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("onnx", reason='the export extra is not installed: pip install "qkv[export]"')
pytest.importorskip(
    "onnxruntime", reason='the export extra is not installed: pip install "qkv[export]"'
)

import qkv
from qkv.export.onnx import export
from qkv.inference import prepare_for_decoding
from qkv.onnx import OnnxEngine, OnnxTranslator
from qkv.translate import Translator
from tiny_run import make_tiny_run


@pytest.mark.parametrize(
    "overrides",
    [
        dict(norm_first=False, positional="sinusoidal"),
        dict(norm_first=True, positional="learned", activation="gelu"),
    ],
    ids=["post-LN", "pre-LN learned positions gelu"],
)
@pytest.mark.parametrize("batch, src_len", [(1, 1), (7, 60), (3, 9)])
def test_the_graphs_give_the_engines_logits_for_shapes_never_traced(
    tmp_path, overrides, batch, src_len
):
    run_dir = make_tiny_run(tmp_path / "run", seed=5, **overrides)
    out = export(run_dir, tmp_path / "onnx")  # traced with batch 2, source length 4, past 3
    model = Translator.load(run_dir).model
    config = model.config
    torch.manual_seed(batch)
    src = torch.randint(4, config.src_vocab_size, (batch, src_len))
    src[:, -1] = config.eos_id
    if batch > 1:
        src[0, src_len // 2 :] = config.pad_id  # a shorter sentence: padding masked in both
        src[0, src_len // 2 - 1] = config.eos_id
    engines = [prepare_for_decoding(model), OnnxEngine(out)]
    steps = []
    with torch.inference_mode():
        for engine in engines:
            memory, mask = engine.encode(src)
            cache = engine.new_cache(max_beams=1)
            tokens = torch.full((batch,), config.bos_id)
            logits = []
            for step in range(6):
                logits.append(engine.step(tokens, memory, mask, cache)[:, -1])
                tokens = torch.randint(
                    4,
                    config.tgt_vocab_size,
                    (batch,),
                    generator=torch.Generator().manual_seed(step),
                )
            steps.append(torch.stack(logits, dim=1))
    torch.testing.assert_close(steps[1], steps[0], rtol=0, atol=1e-4)


def test_the_demo_model_translates_the_same(demo_run, tmp_path):
    run_dir = demo_run[0] / "runs" / "demo"
    sentences = (run_dir / "data" / "test.words").read_text().splitlines()[:150]
    out = export(run_dir, tmp_path / "onnx")
    ours, theirs = Translator.load(run_dir), qkv.load(out)
    assert isinstance(theirs, OnnxTranslator)
    greedy = [ours.hypotheses(sentences, beam=1), theirs.hypotheses(sentences, beam=1)]
    assert [h[0].ids for h in greedy[0]] == [h[0].ids for h in greedy[1]]
    beam = [ours.hypotheses(sentences, beam=5), theirs.hypotheses(sentences, beam=5)]
    same = [a[0].ids == b[0].ids for a, b in zip(*beam, strict=True)]
    assert sum(same) >= 0.99 * len(sentences)
    for a, b, equal in zip(*beam, same, strict=True):
        if equal:
            assert abs(a[0].score - b[0].score) < 1e-3


def test_qkv_export_onnx_then_qkv_translate_on_the_directory(run_qkv, demo_run, tmp_path):
    run_dir = demo_run[0] / "runs" / "demo"
    out = tmp_path / "onnx"
    result = run_qkv("export", run_dir, "--format", "onnx", "-o", out)
    assert result.returncode == 0, result.stderr
    assert "opset 17" in result.stdout
    text = "the third of may nineteen ninety\n\ntwelve june two thousand and one\n"
    # fp32, as onnxruntime runs it ("auto" is bf16 on a CPU with bf16, whose second best may differ)
    ours = run_qkv(
        "translate", run_dir, "--precision", "fp32", "--n-best", "2", "--scores", input=text
    )
    theirs = run_qkv("translate", out, "--n-best", "2", "--scores", input=text)
    assert theirs.returncode == 0, theirs.stderr
    assert theirs.stdout.splitlines()[0].split("\t")[2] == "1990-05-03"
    assert [line.split("\t")[2] for line in theirs.stdout.splitlines()] == [
        line.split("\t")[2] for line in ours.stdout.splitlines()
    ]
    assert "exported, run by onnxruntime in fp32" in theirs.stderr
    refused = run_qkv(
        "export", run_dir, "--format", "onnx", "-o", out, "--quantization", "int8", "--force"
    )
    assert (
        refused.returncode == 2 and "--quantization is for --format ctranslate2" in refused.stderr
    )
