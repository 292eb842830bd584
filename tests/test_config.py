"""Configs: TOML into dataclasses; unknown names and wrong types are errors that name them."""

import dataclasses
import platform
import re
import subprocess
import sys
import typing

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from conftest import qkv_env
from qkv.cli import recipe_names, resolve_recipe
from qkv.config import Config, dump_toml, load_config, parse_override, toml_value
from qkv.errors import QkvError
from qkv.hardware import AVX2_ENVIRONMENT


def write(tmp_path, text):
    path = tmp_path / "run.toml"
    path.write_text(text)
    return path


def test_values_and_overrides(tmp_path):
    path = write(tmp_path, '[model]\npreset = "tiny"\n[train]\nlr = 2\nmax_steps = 10\n')
    config = load_config(path, ["train.max_steps=99", "data.dataset=synthetic", "eval.beam=4"])
    assert config.model.preset == "tiny"
    assert config.train.lr == 2.0 and isinstance(config.train.lr, float)
    assert config.train.max_steps == 99
    assert config.data.dataset == "synthetic"  # a bare word is taken as a string
    assert config.eval.beam == 4


def test_unknown_section_is_named(tmp_path):
    with pytest.raises(QkvError, match=r"unknown section \[optimizer\]"):
        load_config(write(tmp_path, "[optimizer]\nlr = 1\n"))


def test_a_bad_override_is_named_by_its_set_option_not_the_file(tmp_path):
    path = write(tmp_path, "[train]\nlr = 2\n")
    with pytest.raises(QkvError) as error:
        load_config(path, ["train.lr=abc"])
    assert str(error.value) == "--set train.lr=abc: train.lr must be a number, not str 'abc'"
    with pytest.raises(QkvError, match=r"^--set train\.lrr=1: unknown key train\.lrr"):
        load_config(path, ["train.lrr=1"])


def test_data_to_prepare_names_both_languages(tmp_path):
    # Was "--src-lang and --tgt-lang", qkv prepare's options, once the run had started
    with pytest.raises(QkvError, match=r"data\.src_lang and data\.tgt_lang"):
        load_config(write(tmp_path, '[data]\ndataset = "multi30k"\nsrc_lang = "de"\n'))
    assert load_config(write(tmp_path, '[data]\ndataset = "synthetic"\n')).data.src_lang is None


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(QkvError, match=r"unknown key train\.learning_rate"):
        load_config(write(tmp_path, "[train]\nlearning_rate = 1\n"))


def test_wrong_type_names_key_and_expected_type(tmp_path):
    with pytest.raises(QkvError, match=r"train\.max_steps must be an integer, not str 'many'"):
        load_config(write(tmp_path, '[train]\nmax_steps = "many"\n'))
    with pytest.raises(QkvError, match=r"train\.compile must be true or false"):
        load_config(None, ["train.compile=1"])


def test_bad_override_and_bad_toml(tmp_path):
    with pytest.raises(QkvError, match=r"expected section\.key=value"):
        parse_override("max_steps=3")
    with pytest.raises(QkvError, match="not valid TOML"):
        load_config(write(tmp_path, "[train\n"))
    with pytest.raises(QkvError, match="no such config file"):
        load_config(tmp_path / "missing.toml")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.toml").write_text("")
    with pytest.raises(QkvError) as error:  # it said "no such config file" of a folder
        load_config(tmp_path / "run")
    assert str(error.value) == (
        f"{tmp_path / 'run'} is a folder, not a config file (the run's config is "
        f"{tmp_path / 'run' / 'config.toml'})"
    )


def test_model_config_uses_preset_overrides_and_tokenizer_ids():
    config = load_config(None, ["model.preset=small", "model.n_encoder_layers=4"])
    model_config = config.model_config(123, dict(pad_id=0, bos_id=2, eos_id=3))
    assert (model_config.d_model, model_config.n_encoder_layers) == (256, 4)
    assert model_config.src_vocab_size == model_config.tgt_vocab_size == 123
    with pytest.raises(
        QkvError, match=r"model\.preset must be one of 'tiny', 'small', 'base', 'big', not 'medium'"
    ):
        load_config(None, ["model.preset=medium"]).model_config(10, {})


def test_dump_toml_round_trips(tmp_path):
    config = load_config(
        None, ["train.max_steps=7", "data.dataset=multi30k", "data.src_lang=de", "data.tgt_lang=en"]
    )
    assert load_config(write(tmp_path, dump_toml(config))) == config


@pytest.mark.parametrize("name", ["demo", "multi30k_de_en", "multi30k_en_de", "base", "big"])
def test_bundled_recipes_load(name):
    assert name in recipe_names()
    config = load_config(resolve_recipe(name))
    assert isinstance(config, Config)
    config.model_config(8000, dict(pad_id=0, bos_id=2, eos_id=3))


RECIPES_IN_AUTO = ["multi30k_de_en", "multi30k_en_de", "base", "big"]


@pytest.mark.parametrize("name", RECIPES_IN_AUTO)
def test_bundled_recipes_train_in_the_precision_the_machine_computes_natively(name):
    assert load_config(resolve_recipe(name)).train.precision == "auto"


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 settings")
def test_on_a_cpu_without_bf16_the_recipes_train_in_fp32_without_being_told():
    """The recipes once said bf16, which trained 20x slower than fp32 on an AMD Zen 3."""
    code = (
        "from qkv.cli import resolve_recipe; from qkv.config import load_config; "
        "from qkv.hardware import resolve_precision; "
        f"names = {RECIPES_IN_AUTO!r}; "
        "print(sorted({resolve_precision(load_config(resolve_recipe(n)).train.precision, 'cpu') "
        "for n in names}))"
    )
    result = subprocess.run(
        [sys.executable, "-W", "error", "-c", code],
        env=qkv_env(**AVX2_ENVIRONMENT),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "['fp32']"


def test_the_demo_trains_in_fp32_everywhere():
    """The newcomer's first run gives the same result on every CPU."""
    assert load_config(resolve_recipe("demo")).train.precision == "fp32"


# --- every value is checked when the config is read ----------------------------------------------

SPECIALS = dict(pad_id=0, bos_id=2, eos_id=3)


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "model.d_model=-8",
            "model.d_model must be a positive multiple of model.n_heads (4), not -8",
        ),
        (
            "model.d_model=0",
            "model.d_model must be a positive multiple of model.n_heads (4), not 0",
        ),
        (
            "model.d_model=-5",
            "model.d_model must be a positive multiple of model.n_heads (4), not -5",
        ),
        ("model.n_heads=0", "model.n_heads must be an integer of at least 1, not 0"),
        ("model.dropout=1.5", "model.dropout must be a probability in [0, 1), not 1.5"),
        ("train.lr=-1", "train.lr must be a finite number above 0, not -1.0"),
        ("train.warmup_steps=0", "train.warmup_steps must be an integer of at least 1, not 0"),
        ("train.max_tokens=0", "train.max_tokens must be an integer of at least 1, not 0"),
        (
            "train.precision='fp16'",
            "train.precision must be one of 'auto', 'fp32', 'bf16', not 'fp16'",
        ),
        ("eval.beam=0", "eval.beam must be an integer of at least 1, not 0"),
        ("train.seed=-1", "train.seed must be an integer in [0, 2**32), not -1"),
        ("data.seed=4294967296", "data.seed must be an integer in [0, 2**32), not 4294967296"),
    ],
)
def test_a_bad_value_is_an_error_naming_the_key_the_value_and_the_rule(override, message):
    with pytest.raises(QkvError) as error:
        load_config(None, [override])
    assert str(error.value) == f"--set {override}: {message}"


def test_a_bad_value_is_named_by_the_file_or_the_set_that_gave_it(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text("[model]\nd_model = -8\n[train]\nlr = 1.0\n")
    with pytest.raises(QkvError) as error:
        load_config(config)
    assert str(error.value) == (
        f"{config}: model.d_model must be a positive multiple of model.n_heads (4), not -8"
    )
    with pytest.raises(QkvError) as error:  # the file's value mended; the last --set breaks lr
        load_config(config, ["model.d_model=64", "train.lr=2", "train.lr=-1"])
    assert (
        str(error.value) == "--set train.lr=-1: train.lr must be a finite number above 0, not -1.0"
    )


def any_value():
    return st.one_of(
        st.integers(-(10**6), 10**6),
        st.floats(allow_nan=True, allow_infinity=True),
        st.booleans(),
        st.text(max_size=12),
        st.lists(st.floats(-2, 2), max_size=3),
    )


KEYS = [
    (section.name, key.name)
    for section in dataclasses.fields(Config)
    for key in dataclasses.fields(typing.get_type_hints(Config)[section.name])
]


@settings(max_examples=300, deadline=None)
@given(key=st.sampled_from(KEYS), value=any_value())
@example(key=("model", "d_model"), value="\n")  # its message was two lines
def test_any_value_of_any_key_loads_into_a_buildable_config_or_is_one_clear_error(key, value):
    section, name = key
    try:
        config = load_config(None, [f"{section}.{name}={toml_value(value)}"])
    except QkvError as error:
        assert re.match(r"(config: |--set .*?: )?\w+\.\w+[ :]", str(error)), str(error)
        assert "\n" not in str(error), str(error)
        return
    if config.model.preset in ("tiny", "small"):
        config.model_config(8000, SPECIALS)  # the model the config describes can be built


@settings(max_examples=50, deadline=None)
@given(data=st.binary(max_size=200))
def test_random_bytes_as_a_config_file_are_one_clear_error_or_a_config(data, tmp_path_factory):
    path = tmp_path_factory.mktemp("config") / "random.toml"
    path.write_bytes(data)
    try:
        load_config(path)
    except QkvError as error:
        assert str(error)


@pytest.mark.parametrize("override", ["model.d_model=-8", "model.n_heads=0", "train.lr=-1"])
def test_cli_train_rejects_a_bad_value_before_touching_data_or_making_a_folder(
    run_qkv, tmp_path, override
):
    out = tmp_path / "run"
    result = run_qkv("train", "multi30k_en_de", "--out", out, "--set", override)
    assert result.returncode == 2
    assert result.stderr.startswith("qkv: error: ") and len(result.stderr.splitlines()) == 1
    assert not out.exists()


def test_cli_train_rejects_a_config_file_of_random_bytes(run_qkv, tmp_path):
    config = tmp_path / "bytes.toml"
    config.write_bytes(bytes(range(256)))
    result = run_qkv("train", config, "--out", tmp_path / "run")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"qkv: error: {config}: not valid TOML")
    assert not (tmp_path / "run").exists()


def test_a_cosine_schedule_needs_a_step_count_when_the_config_is_read(tmp_path):
    with pytest.raises(QkvError, match=r"train\.max_steps must be above 0 with train\.lr_schedule"):
        load_config(write(tmp_path, '[train]\nlr_schedule = "cosine"\n'))
    assert load_config(write(tmp_path, '[train]\nlr_schedule = "cosine"\nmax_steps = 5\n'))


def test_the_model_section_overrides_transformer_config_and_has_no_defaults_of_its_own():
    import dataclasses

    from qkv.config import ModelSection
    from qkv.model import TransformerConfig

    model_fields = {f.name for f in dataclasses.fields(TransformerConfig)}
    for field in dataclasses.fields(ModelSection):
        if field.name != "preset":
            assert field.name in model_fields, field.name
            assert field.default is None, field.name  # the preset's or TransformerConfig's value
    # A joint tokenizer's one vocabulary: shared embeddings, as the paper's models (section 3.4).
    config = load_config().model_config(100, dict(pad_id=0, bos_id=2, eos_id=3))
    assert config.share_embeddings and config.tie_output
