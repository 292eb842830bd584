"""qkv.hardware: which precision 'auto' means on which device, and the warning for slow bf16."""

from pathlib import Path

import pytest
import torch

from qkv import hardware
from qkv.errors import QkvError
from qkv.hardware import describe_cpu, resolve_precision


@pytest.fixture
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(hardware, "_warned", set())


@pytest.mark.parametrize("native, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_is_bf16_exactly_where_the_cpu_computes_it_natively(monkeypatch, native, expected):
    monkeypatch.setattr(hardware, "cpu_bf16_native", lambda: native)
    assert resolve_precision("auto", "cpu") == expected
    assert resolve_precision("fp32", "cpu") == "fp32"


def test_explicit_bf16_without_native_bf16_warns_once_and_stays_bf16(monkeypatch, fresh_warnings):
    monkeypatch.setattr(hardware, "cpu_bf16_native", lambda: False)
    messages = []
    for _ in range(3):
        assert resolve_precision("bf16", "cpu", messages.append) == "bf16"
    assert len(messages) == 1
    assert "no bf16 instructions" in messages[0] and "20x slower" in messages[0]
    assert torch.backends.cpu.get_cpu_capability() in messages[0]


def test_explicit_bf16_with_native_bf16_does_not_warn(monkeypatch, fresh_warnings):
    monkeypatch.setattr(hardware, "cpu_bf16_native", lambda: True)
    messages = []
    assert resolve_precision("bf16", "cpu", messages.append) == "bf16"
    assert messages == []


def test_an_unknown_precision_is_a_clear_error():
    with pytest.raises(QkvError, match="precision must be one of auto, fp32, bf16, not 'fp16'"):
        resolve_precision("fp16", "cpu")


def test_bf16_is_native_only_where_onednn_computes_it():
    """oneDNN's own check is necessary (it is False under ONEDNN_MAX_CPU_ISA=AVX2): 'auto' must never
    choose bf16 where oneDNN has no bf16 kernels."""
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        assert not hardware.cpu_bf16_native()
    else:
        capabilities = hardware._cpu_capabilities()
        flags = [name for name, value in capabilities.items() if value is True]
        assert hardware.cpu_bf16_native() == any(name.endswith("bf16") for name in flags)


def test_the_cpu_is_named_with_its_capability_and_any_isa_limit(monkeypatch):
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    line = describe_cpu()
    assert line.startswith(f"CPU: {hardware.cpu_name()}; ATen capability ")
    assert torch.backends.cpu.get_cpu_capability() in line
    assert "bf16 native: " in line and "ONEDNN_MAX_CPU_ISA=AVX2" in line


def test_ci_runs_the_tests_again_under_the_avx2_settings():
    script = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()
    for name, value in hardware.AVX2_ENVIRONMENT.items():
        assert f"{name}={value}" in script
