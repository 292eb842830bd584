"""Configs: TOML into dataclasses; unknown names and wrong types are errors that name them."""

import platform
import subprocess
import sys

import pytest

from conftest import qkv_env
from qkv.cli import recipe_names, resolve_recipe
from qkv.config import Config, dump_toml, load_config, parse_override
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


def test_model_config_uses_preset_overrides_and_tokenizer_ids():
    config = load_config(None, ["model.preset=small", "model.n_encoder_layers=4"])
    model_config = config.model_config(123, dict(pad_id=0, bos_id=2, eos_id=3))
    assert (model_config.d_model, model_config.n_encoder_layers) == (256, 4)
    assert model_config.src_vocab_size == model_config.tgt_vocab_size == 123
    with pytest.raises(QkvError, match="unknown preset 'medium'"):
        load_config(None, ["model.preset=medium"]).model_config(10, {})


def test_dump_toml_round_trips(tmp_path):
    config = load_config(None, ["train.max_steps=7", "data.dataset=multi30k"])
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
