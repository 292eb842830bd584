"""qkv.hardware: which precision 'auto' means on which device, and the warning for slow bf16."""

import platform
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


def test_without_pytorchs_map_of_the_cpu_the_kernels_flags_say_whether_bf16_is_native(monkeypatch):
    """PyTorch 2.4 has neither `torch.cpu.get_capabilities` nor `_is_avx512_bf16_supported`."""
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("oneDNN has no bf16 path here: bf16 is not native whatever the flags")
    monkeypatch.setattr(hardware, "_cpu_capabilities", dict)
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported", raising=False)
    hardware.cpu_bf16_native.cache_clear()
    try:
        flags = hardware._kernel_cpu_flags()
        assert hardware.cpu_bf16_native() == bool(hardware.KERNEL_BF16_FLAGS & flags)
        monkeypatch.setattr(hardware, "_kernel_cpu_flags", lambda: {"avx2", "avx512_bf16"})
        hardware.cpu_bf16_native.cache_clear()
        assert hardware.cpu_bf16_native()
        monkeypatch.setattr(hardware, "_kernel_cpu_flags", lambda: {"avx2", "avx512f"})
        hardware.cpu_bf16_native.cache_clear()
        assert not hardware.cpu_bf16_native()
    finally:  # the next call, after the patches are undone, asks afresh
        hardware.cpu_bf16_native.cache_clear()


def test_bf16_is_native_only_where_onednn_computes_it():
    """oneDNN's own check is necessary (it is False under ONEDNN_MAX_CPU_ISA=AVX2): 'auto' must never
    choose bf16 where oneDNN has no bf16 kernels."""
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        assert not hardware.cpu_bf16_native()
        return
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file() and platform.machine() == "x86_64":  # the kernel's word, not PyTorch's
        flags = next(line for line in cpuinfo.read_text().splitlines() if line.startswith("flags"))
        bf16 = {"avx512_bf16", "amx_bf16"} & set(flags.split(":", 1)[1].split())
        assert hardware.cpu_bf16_native() == bool(bf16), bf16
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
