"""`qkv serve`: LibreTranslate's API and qkv's own, every error as {"error": ...}, batching across
requests, metrics, and a real server on a loopback port."""

from __future__ import annotations

import asyncio
import html
import itertools
import json
import math
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install 'qkv[serve]'")
import httpx
from fastapi.testclient import TestClient

import qkv
from conftest import qkv_env
from qkv.inference import buckets
from qkv.inference.step_programs import BEAMS
from qkv.serve import compile_ahead, load_models
from qkv.serve.app import create_app
from qkv.serve.service import ServedModel, Service
from qkv.translate import Translator
from torch_versions import needs_compiled_step
from toy_task import reverse

LINES = ["a b c", "d e", "f g h i"]


@pytest.fixture(scope="module")
def models(toy_run):
    return load_models([str(toy_run)], precision="fp32")  # xx -> yy: reverses its letters


@pytest.fixture(scope="module")
def expected(toy_run):
    return Translator.load(toy_run).translate(LINES, beam=5)


@pytest.fixture
def client(models):
    with TestClient(create_app(models)) as client:
        yield client


def test_the_page_is_one_self_contained_file(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert (
        "<title>qkv: xx \u2192 yy</title>" in page.text
        and "QKV.matrix(" in page.text
        and "v1/translate" in page.text
    )
    for reference in (
        "http://",
        "https://",
        "src=",
        "@import",
        "url(",
    ):  # tests/test_page.py runs it
        assert reference not in page.text


def test_health_and_languages(client):
    assert client.get("/health").json()["status"] == "ok"
    assert client.head("/health").status_code == client.head("/").status_code == 200
    # Every language is a code of its own, the target too: Weblate looks for both of a pair there.
    assert client.get("/languages").json() == [
        {"code": "xx", "name": "xx", "targets": ["yy"]},
        {"code": "yy", "name": "yy", "targets": []},
    ]
    settings = client.get("/frontend/settings").json()
    assert settings["charLimit"] == 5000 and settings["keyRequired"] is False
    assert settings["language"] == {
        "source": {"code": "xx", "name": "xx"},
        "target": {"code": "yy", "name": "yy"},
    }


def test_pages_of_any_origin_may_call_it_as_libretranslates(client):
    preflight = client.options(
        "/translate",
        headers={"Origin": "https://example.org", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "Content-Type"},
    )  # fmt: skip
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "*"
    assert "POST" in preflight.headers["access-control-allow-methods"]
    answer = client.post(
        "/translate",
        json={"q": "a b", "source": "xx", "target": "yy"},
        headers={"Origin": "https://example.org"},
    )
    assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == "*"


def test_libretranslate_json_string_and_list_and_form(client, expected):
    one = client.post("/translate", json={"q": LINES[0], "source": "xx", "target": "yy"})
    assert one.status_code == 200 and one.json() == {"translatedText": expected[0]}
    many = client.post("/translate", json={"q": LINES, "source": "xx", "target": "yy"})
    assert many.json() == {"translatedText": expected}
    form = client.post("/translate", data={"q": LINES[1], "source": "xx", "target": "yy"})
    assert form.json() == {"translatedText": expected[1]}
    auto = client.post("/translate", json={"q": LINES[0], "source": "auto", "target": "yy"})
    assert auto.json()["detectedLanguage"] == {"confidence": 100.0, "language": "xx"}


def test_libretranslate_asks_for_no_scores_and_qkvs_api_for_them(client, models, monkeypatch):
    """LibreTranslate's answer shows no score, so its searches compute none (greedy on one sentence
    then screens its output product); `/v1/translate` shows them."""
    translator, asked = models[0].translator, []
    hypotheses = translator.hypotheses

    def spy(sentences, **options):
        asked.append(options["scores"])
        return hypotheses(sentences, **options)

    monkeypatch.setattr(translator, "hypotheses", spy)
    body = {"q": LINES[0], "source": "xx", "target": "yy"}
    assert client.post("/translate", json=body).status_code == 200
    assert client.post("/translate", json={**body, "format": "html"}).status_code == 200
    answer = client.post("/v1/translate", json={"text": [LINES[0]], "source": "xx", "target": "yy"})
    assert math.isfinite(answer.json()["translations"][0]["hypotheses"][0]["score"])
    assert asked == [False, False, True]


def test_alternatives_are_the_next_best_hypotheses(client, toy_run):
    answer = client.post(
        "/translate", json={"q": LINES[0], "source": "xx", "target": "yy", "alternatives": 2}
    ).json()
    best = Translator.load(toy_run).hypotheses([LINES[0]], beam=5, n_best=3)[0]
    assert answer["translatedText"] == best[0].text
    assert answer["alternatives"] == [best[1].text, best[2].text]
    # As LibreTranslate's: fewer than none is none; html has none (an empty list each)
    fewer = {"q": LINES[0], "source": "xx", "target": "yy", "alternatives": -1}
    assert client.post("/translate", json=fewer).json() == {"translatedText": best[0].text}
    html = {"q": [f"<p>{LINES[0]}</p>"], "source": "xx", "target": "yy", "format": "html"}
    answer = client.post("/translate", json={**html, "alternatives": 2}).json()
    assert answer == {"translatedText": [f"<p>{best[0].text}</p>"], "alternatives": [[]]}


def test_html_translates_the_text_nodes_and_keeps_the_markup(client, models, expected):
    page = (
        '<p class="x">a b c</p>\n<br/><b> d e </b><!-- f g --><script>var a = "b";</script>'
        "<i>f g h i</i>"
    )
    body = {"q": page, "source": "xx", "target": "yy", "format": "html"}
    answer = client.post("/translate", json=body).json()["translatedText"]
    assert answer == (
        f'<p class="x">{expected[0]}</p>\n<br/><b> {expected[1]} </b><!-- f g -->'
        f'<script>var a = "b";</script><i>{expected[2]}</i>'
    )
    markup_only = client.post("/translate", json={**body, "q": "<br/>"}).json()
    assert markup_only == {"translatedText": "<br/>"}
    # A "<" that opens no tag is text, and the sentence around it one sentence
    bare = client.post("/translate", json={**body, "q": "<P>f < g</P>"}).json()["translatedText"]
    one_sentence = models[0].translator.translate(["f < g"], beam=5)[0]
    assert bare == f"<P>{html.escape(one_sentence, quote=False)}</P>"


def test_fields_may_come_in_the_query_string_as_libretranslate_reads_them(client, expected):
    answer = client.post("/translate", params={"q": LINES[0], "source": "xx", "target": "yy"})
    assert answer.json() == {"translatedText": expected[0]}
    form = client.post("/translate?target=yy", data={"q": LINES[0], "source": "xx"})
    assert form.json() == {"translatedText": expected[0]}


def test_a_hundred_sentences_unicode_and_an_empty_one(client):
    lines = [f"{'a b c d'[: 1 + i % 7]}" for i in range(100)] + ["é ü 漢字", ""]
    answer = client.post("/translate", json={"q": lines, "source": "xx", "target": "yy"})
    assert answer.status_code == 200
    translated = answer.json()["translatedText"]
    assert len(translated) == 102 and translated[-1] == ""


@pytest.mark.parametrize(
    "body, status, message",
    [
        ({"source": "xx", "target": "yy"}, 400, "missing field: q"),
        ({"q": "a", "source": "xx"}, 400, "missing field: target"),
        ({"q": "a", "target": "yy"}, 400, "missing field: source"),
        ({"q": "a", "source": "de", "target": "en"}, 400, "no model translates de->en"),
        ({"q": 5, "source": "xx", "target": "yy"}, 400, "q must be a string or a list"),
        ({"q": "a", "source": "xx", "target": "yy", "format": "pdf"}, 400, "format must be"),
        ({"q": "a", "source": "xx", "target": "yy", "alternatives": "x"}, 400, "alternatives"),
        # int() took these as 1; a list of codes was shown as "no model translates xx->['yy']"
        (
            {"q": "a", "source": "xx", "target": "yy", "alternatives": 1.5},
            400,
            "alternatives must be a whole number, not 1.5",
        ),
        (
            {"q": "a", "source": "xx", "target": "yy", "alternatives": True},
            400,
            "alternatives must be a whole number, not True",
        ),
        (
            {"q": "a", "source": "xx", "target": ["yy"]},
            400,
            "target must be a language code (a string), not ['yy']",
        ),
        ({"q": "a", "source": 1, "target": "yy"}, 400, "source must be a language code"),
        ({"q": "a" * 5001, "source": "xx", "target": "yy"}, 413, "limit of 5000"),
    ],
)
def test_bad_requests_get_a_clear_error(client, body, status, message):
    answer = client.post("/translate", json=body)
    assert answer.status_code == status
    assert message in answer.json()["error"]


def test_a_text_longer_than_the_model_reads_is_refused_not_cut(client, models):
    """`qkv translate` cuts such a line and warns on stderr; a client sees no warning, and would
    keep the translation of the text's beginning as the whole's."""
    limit = models[0].translator.model.config.max_len - 1
    long = " ".join(["a"] * (limit + 3))
    message = f"more than the model reads ({limit}): split it"
    body = {"q": ["a b", long], "source": "xx", "target": "yy"}
    answer = client.post("/translate", json=body)
    assert answer.status_code == 400 and answer.json()["error"].startswith("text 2: ")
    assert message in answer.json()["error"]
    page = f"<p>a b</p><p>{long}</p>"
    answer = client.post("/translate", json={**body, "q": ["c", page], "format": "html"})
    assert answer.status_code == 400 and answer.json()["error"].startswith("text 2: ")
    v1 = {"text": [long], "source": "xx", "target": "yy"}
    answer = client.post("/v1/translate", json=v1)
    assert answer.status_code == 400 and message in answer.json()["error"]
    answer = client.post("/v1/explain", json={"text": long, "source": "xx", "target": "yy"})
    assert answer.status_code == 400 and message in answer.json()["error"]
    # As long as it reads: translated whole.
    fits = " ".join(["a"] * limit)
    answer = client.post("/translate", json={**body, "q": fits})
    assert answer.status_code == 200, answer.json()


def test_text_utf8_cannot_hold_is_a_400_not_a_500(client):
    body = b'{"q": ["a b", "x \\ud800 y"], "source": "xx", "target": "yy"}'
    answer = client.post("/translate", content=body, headers={"content-type": "application/json"})
    assert answer.status_code == 400 and answer.json()["error"].startswith("text 2:")
    v1 = b'{"text": ["\\udfff"], "source": "xx", "target": "yy"}'
    answer = client.post("/v1/translate", content=v1, headers={"content-type": "application/json"})
    assert answer.status_code == 400


def test_an_unknown_route_is_a_404_in_the_same_shape(client):
    answer = client.get("/nowhere")
    assert answer.status_code == 404 and answer.json() == {"error": "Not Found"}


def test_a_body_that_is_not_json_is_a_400(client):
    answer = client.post("/translate", content=b"{not json", headers={"content-type": "text/plain"})
    assert answer.status_code == 400 and "not valid JSON" in answer.json()["error"]


def test_api_keys_are_required_when_given(models, expected):
    with TestClient(create_app(models, api_keys={"secret"})) as client:
        assert client.get("/frontend/settings").json()["keyRequired"] is True
        body = {"q": LINES[0], "source": "xx", "target": "yy"}
        assert client.post("/translate", json=body).status_code == 403
        assert client.post("/translate", json={**body, "api_key": "wrong"}).status_code == 403
        answer = client.post("/translate", json={**body, "api_key": "secret"})
        assert answer.json() == {"translatedText": expected[0]}
        # qkv's own routes translate and look inside too: the same keys
        for route, body in [
            ("/v1/translate", {"text": [LINES[0]], "source": "xx", "target": "yy"}),
            ("/v1/explain", {"text": LINES[0], "source": "xx", "target": "yy"}),
        ]:
            for refused in ({}, {"api_key": "wrong"}):
                answer = client.post(route, json={**body, **refused})
                assert answer.status_code == 403, route
                assert answer.json() == {"error": "invalid or missing api_key"}
            assert client.post(route, json={**body, "api_key": "secret"}).status_code == 200


def test_a_fault_of_the_servers_is_a_500_in_the_same_shape_and_counted(models, monkeypatch):
    def broken(sentences, **search):
        raise RuntimeError("a bug of the server's")

    monkeypatch.setattr(models[0].translator, "hypotheses", broken)
    with TestClient(create_app(models), raise_server_exceptions=False) as client:
        body = {"text": ["a b"], "source": "xx", "target": "yy"}
        answer = client.post("/v1/translate", json=body, headers={"Origin": "https://example.org"})
        assert answer.status_code == 500
        assert answer.json() == {"error": "internal error (RuntimeError)"}
        assert answer.headers["access-control-allow-origin"] == "*"  # a page elsewhere reads it
        metrics = client.get("/metrics").text
    assert 'qkv_requests_total{route="/v1/translate",status="500"} 1.0' in metrics


def test_metrics_count_by_declared_route_not_by_the_clients_path(client):
    for path in ("/scan-1", "/scan-2", "/docs"):
        client.get(path)
    metrics = client.get("/metrics").text
    assert 'qkv_requests_total{route="other",status="404"} 2.0' in metrics
    assert 'route="/docs"' in metrics and "scan" not in metrics


def test_a_length_penalty_past_what_a_float_holds_is_a_400(client):
    body = {"text": ["a b"], "source": "xx", "target": "yy"}
    for alpha, message in [(1000, "less than or equal to 10"), (-11, "greater than or equal")]:
        answer = client.post("/v1/translate", json={**body, "length_penalty": alpha})
        assert answer.status_code == 400 and message in answer.json()["error"]
    answer = client.post(
        "/v1/translate",
        content=json.dumps({**body, "length_penalty": float("nan")}),
        headers={"content-type": "application/json"},
    )
    assert answer.status_code == 400 and "finite" in answer.json()["error"]


def test_a_full_queue_is_a_429_with_retry_after(models):
    with TestClient(create_app(models, max_queue=0)) as client:
        answer = client.post("/translate", json={"q": "a", "source": "xx", "target": "yy"})
        assert answer.status_code == 429 and answer.headers["retry-after"] == "1"
        assert "retry" in answer.json()["error"]


def test_v1_translate_gives_hypotheses_scores_and_subword_tokens(client, toy_run):
    body = {"text": [LINES[0]], "source": "xx", "target": "yy", "beam": 4, "n_best": 2}
    answer = client.post("/v1/translate", json=body).json()
    hypotheses = answer["translations"][0]["hypotheses"]
    reference = Translator.load(toy_run).hypotheses([LINES[0]], beam=4, n_best=2)[0]
    assert [h["text"] for h in hypotheses] == [h.text for h in reference]
    assert [h["score"] for h in hypotheses] == pytest.approx([h.score for h in reference])
    assert "".join(hypotheses[0]["tokens"]).replace("▁", " ").strip() == reference[0].text
    bad = client.post("/v1/translate", json={"text": "not a list", "source": "xx", "target": "yy"})
    assert bad.status_code == 400 and "text" in bad.json()["error"]
    not_json = client.post(
        "/v1/translate", content=b"{text", headers={"content-type": "application/json"}
    )
    assert not_json.status_code == 400 and not_json.json() == {
        "error": "the body is not valid JSON"
    }
    too_many = client.post("/v1/translate", json={**body, "n_best": 5})
    assert too_many.status_code == 400 and "n_best" in too_many.json()["error"]


def test_v1_translate_searches_with_the_servers_beam_unless_the_request_gives_one(
    models, monkeypatch
):
    """`qkv serve --beam 1` compiles ahead for beam 1: a request that names no beam must not
    search with another (nor wait for another's compile); n_best widens it, as alternatives do."""
    translator = models[0].translator
    beams = []

    def spy(sentences, beam, **search):
        beams.append(beam)
        return Translator.hypotheses(translator, sentences, beam=beam, **search)

    monkeypatch.setattr(translator, "hypotheses", spy)
    body = {"text": [LINES[0]], "source": "xx", "target": "yy"}
    with TestClient(create_app(models, beam=1)) as client:
        for extra in ({}, {"n_best": 3}, {"beam": 4, "n_best": 2}):
            answer = client.post("/v1/translate", json={**body, **extra})
            assert answer.status_code == 200, answer.text
            hypotheses = answer.json()["translations"][0]["hypotheses"]
            assert len(hypotheses) == extra.get("n_best", 1)
    assert beams == [1, 3, 4]


def test_concurrent_requests_share_batches_and_each_gets_its_own_sentences(models, expected):
    app = create_app(models, max_wait_ms=300)

    async def run():
        transport = httpx.ASGITransport(app=app)
        client = httpx.AsyncClient(transport=transport, base_url="http://qkv")
        async with app.router.lifespan_context(app), client:
            bodies = [{"q": line, "source": "xx", "target": "yy"} for line in LINES * 3]
            answers = await asyncio.gather(*(client.post("/translate", json=b) for b in bodies))
            metrics = (await client.get("/metrics")).text
        return answers, metrics

    answers, metrics = asyncio.run(run())
    assert [a.json()["translatedText"] for a in answers] == expected * 3
    count = float(next(line.split()[-1] for line in metrics.splitlines()
                       if line.startswith("qkv_batch_sentences_count")))  # fmt: skip
    assert count < 9, "9 requests decoded in fewer batches than requests"
    assert 'qkv_requests_total{route="/translate",status="200"} 9.0' in metrics


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_real_server_on_a_loopback_port_answers_and_stops_cleanly_on_sigterm(toy_run, expected):
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "qkv", "serve", str(toy_run), "--port", str(port), "--precision", "fp32"],
        env=qkv_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(200):
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        body = {"q": LINES, "source": "xx", "target": "yy"}
        answer = httpx.post(f"{url}/translate", content=json.dumps(body),
                            headers={"content-type": "application/json"})  # fmt: skip
        assert answer.json() == {"translatedText": expected}
    finally:
        server.send_signal(signal.SIGTERM)
        _, stderr = server.communicate(timeout=30)
    # uvicorn shuts down (the requests in flight finish), then ends by the signal it caught.
    assert server.returncode in (0, -signal.SIGTERM), stderr[-2000:]
    assert "Application shutdown complete" in stderr
    assert "xx -> yy" in stderr


@needs_compiled_step
def test_a_server_with_compile_compiles_before_it_starts_and_translates_the_same(toy_run):
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "qkv", "serve", str(toy_run), "--port", str(port), "--compile",
         "--beam", "3", "--max-wait-ms", "0"],
        # Without measuring the products while compiling (~40% shorter): tests/test_compiled.py
        # compiles programs that measure them.
        env=qkv_env(QKV_COMPILE_AUTOTUNE="0"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(1200):  # compiling comes first (unless an earlier test left the program)
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        for line in ["a b c d", "p o n"]:
            body = {"q": line, "source": "xx", "target": "yy"}
            answer = httpx.post(f"{url}/translate", json=body)
            assert answer.json() == {"translatedText": reverse(line)}
    finally:
        server.send_signal(signal.SIGTERM)
        _, stderr = server.communicate(timeout=30)
    assert server.returncode in (0, -signal.SIGTERM), stderr[-2000:]
    assert "warning" not in stderr
    # With beam 3, one sentence's program (3 rows) and, from 2 sentences (6 rows, over MAX_ROWS),
    # the beam program: compiled or loaded, they sit in the run, with one sentence's encoder. No
    # other test compiles these with these options.
    assert list((toy_run / "compiled").glob("decoder-step-3-rows-*.pt2")), stderr[-2000:]
    if torch.backends.cpu.get_cpu_capability() in buckets.WIDE_VECTORS:
        assert list((toy_run / "compiled").glob("decoder-beam-step-3-beams-*.pt2")), stderr
    assert "compiling the encoder for one sentence" in stderr, stderr[-2000:]


@needs_compiled_step
def test_compile_ahead_runs_every_program_a_batch_can_take(toy_run, monkeypatch):
    here = torch.backends.cpu.get_cpu_capability()  # beam programs: on wide vectors only
    monkeypatch.setattr(buckets, "WIDE_VECTORS", (*buckets.WIDE_VECTORS, here))
    translator = qkv.load(toy_run, compile=True)
    engine = translator.engine()
    programs_run, kinds_run = set(), set()

    def program(arguments, kind=BEAMS):  # the static step as it is: nothing compiled here
        programs_run.add(arguments[0].size(0))
        kinds_run.add((arguments[0].size(0), kind))
        return engine.step_module(kind)

    def beam_program(arguments):  # beams on many sentences (beam_program.py), uncompiled too
        programs_run.add(tuple(arguments[0].shape))  # (sentences, beams)
        return engine.beam_programs.step

    monkeypatch.setattr(engine, "program", program)
    monkeypatch.setattr(engine.beam_programs, "program", beam_program)
    monkeypatch.setattr(engine.source, "program", engine.source.module)  # nor the encoders'
    monkeypatch.setattr(engine.source, "batch_program", engine.source.batch_module)
    assert compile_ahead(translator, beam=1) == 8
    assert programs_run == {1, 2, 3, 4, 5, 8, 16, 32}
    # What a request runs then was run ahead: with beam 1 on one sentence, qkv's API keeps scores
    # (the program that computes every logit, where the greedy one screens its output product) and
    # LibreTranslate's does not (the screening one).
    ran_ahead = set(kinds_run)
    service = Service([ServedModel("toy", translator, "xx", "yy")], 1, 1000, None, True, 1, 99, 9)
    for sentences, scores in itertools.product((1, 3), (True, False)):
        service._decode((0, 1, 1, 0.6, True, scores), ["a b"] * sentences)  # a batch's search
    assert kinds_run == ran_ahead
    programs_run.clear()
    assert compile_ahead(translator, beam=5) == 2 and programs_run == {5, (2, 5)}
    assert compile_ahead(qkv.load(toy_run), beam=1) == 0  # no compiled step to make


def test_a_model_that_cannot_be_loaded_is_a_clear_error_at_start(run_qkv, tmp_path):
    result = run_qkv("serve", tmp_path / "missing")
    assert result.returncode == 2
    assert result.stderr.startswith("qkv: error:") and "missing" in result.stderr


def test_v1_translate_with_attention_gives_the_models_own_weights(client, toy_run):
    from qkv import visualize

    body = {"text": [LINES[0], ""], "source": "xx", "target": "yy", "attention": True}
    first, empty = client.post("/v1/translate", json=body).json()["translations"]
    assert "attention" not in empty  # an empty sentence has nothing to attend to
    attention = first["attention"]
    translator = Translator.load(toy_run)
    src_ids = visualize.source_ids(translator.model, translator.tokenizer, LINES[0])
    best = translator.hypotheses([LINES[0]], beam=5)[0][0]
    pieces = translator.tokenizer.id_to_piece
    tgt_ids = [translator.tokenizer.bos_id, *best.ids]
    maps = visualize.collect_attention(
        translator.model,
        src_ids,
        tgt_ids,
        [pieces(i) for i in src_ids],
        [pieces(i) for i in tgt_ids],
    )
    assert attention["src_tokens"] == maps.src_labels and attention["tgt_tokens"] == maps.tgt_labels
    for kind in ("encoder", "decoder", "cross"):
        got = torch.tensor(attention[kind])
        assert got.shape == maps.weights[kind].shape
        torch.testing.assert_close(got, maps.weights[kind], rtol=0, atol=1e-4)


def test_v1_explain_is_the_step_by_step_of_qkv_explain(client, toy_run):
    from qkv import explain, visualize

    body = {"text": LINES[2], "source": "xx", "target": "yy", "kind": "encoder", "layer": 1,
            "heads": [1]}  # fmt: skip
    answer = client.post("/v1/explain", json=body).json()
    translator = Translator.load(toy_run)
    src_ids = visualize.source_ids(translator.model, translator.tokenizer, LINES[2])
    labels = [translator.tokenizer.id_to_piece(i) for i in src_ids]
    expected = explain.explain(translator.model, src_ids, labels, "encoder", 0, [0])
    assert answer["title"] == expected.title
    assert [step["name"] for step in answer["steps"]] == [step.name for step in expected.steps]
    torch.testing.assert_close(
        torch.tensor(answer["output"]), expected.output.float(), rtol=0, atol=1e-4
    )
    cross = client.post("/v1/explain", json={**body, "kind": "cross"}).json()
    assert cross["translation"] and cross["steps"]
    # The decoder reads the translation it is given (the page sends the beam's best), BOS first.
    given = client.post(
        "/v1/explain", json={**body, "kind": "decoder", "translation": "q r"}
    ).json()
    assert given["translation"] == "q r"
    assert given["steps"][0]["matrices"][0]["row_labels"][1:] == [
        translator.tokenizer.id_to_piece(i) for i in translator.tokenizer.encode("q r")
    ]
    softmax = next(step for step in given["steps"] if step["name"] == "softmax")
    assert softmax["scale"] == "weights" and given["steps"][0]["scale"] == "diverging"
    bad_kind = client.post("/v1/explain", json={**body, "kind": "sideways"})
    assert bad_kind.status_code == 400 and "kind must be one of" in bad_kind.json()["error"]
    bad_layer = client.post("/v1/explain", json={**body, "layer": 9})
    assert bad_layer.status_code == 400 and "does not exist" in bad_layer.json()["error"]


REQUEST_FIELDS = [
    "q", "source", "target", "format", "alternatives", "api_key",  # LibreTranslate's
    "text", "beam", "n_best", "length_penalty", "early_exit", "attention",  # qkv's
    "kind", "layer", "heads", "translation",
]  # fmt: skip


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    body=st.one_of(
        st.binary(max_size=200),
        st.dictionaries(
            st.sampled_from(REQUEST_FIELDS),
            st.one_of(
                st.text(max_size=30),
                st.integers(),
                st.floats(),  # NaN, infinities, 1e300
                st.none(),
                st.lists(st.text(max_size=10), max_size=3),
                st.booleans(),
            ),
        ).map(lambda fields: json.dumps(fields).encode()),
    )
)
def test_no_request_body_gets_a_500(client, body):
    for route in ("/translate", "/v1/translate", "/v1/explain"):
        answer = client.post(route, content=body, headers={"content-type": "application/json"})
        assert answer.status_code in (200, 400, 413), (route, body, answer.text)
        if answer.status_code != 200:
            assert answer.json()["error"]


def test_early_exit_is_the_servers_unless_a_request_says(models, monkeypatch):
    translator = models[0].translator
    original = translator.hypotheses
    searched = []  # early_exit of each decoded batch

    def hypotheses(sentences, **search):
        searched.append(search["early_exit"])
        return original(sentences, **search)

    monkeypatch.setattr(translator, "hypotheses", hypotheses)
    body = {"text": [LINES[0]], "source": "xx", "target": "yy"}
    for server_default in (True, False):
        with TestClient(create_app(models, early_exit=server_default)) as client:
            searched.clear()
            libre = {"q": LINES[1], "source": "xx", "target": "yy"}
            assert client.post("/translate", json=libre).status_code == 200
            assert client.post("/v1/translate", json=body).status_code == 200
            answer = client.post("/v1/translate", json={**body, "early_exit": not server_default})
            assert answer.status_code == 200
            # LibreTranslate's route takes qkv's field too, as JSON or from a form
            answer = client.post("/translate", json={**libre, "early_exit": not server_default})
            assert answer.status_code == 200
            form = {**libre, "early_exit": str(not server_default).lower()}
            assert client.post("/translate", data=form).status_code == 200
            assert searched == [server_default, server_default, *[not server_default] * 3]
            bad = client.post("/translate", json={**libre, "early_exit": "yes"})
            assert bad.status_code == 400, bad.text
            assert bad.json()["error"] == "early_exit must be true or false, not 'yes'"
