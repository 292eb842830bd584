"""What this machine computes natively, and the precision qkv runs in.

``precision = "auto"`` (the default of ``qkv train``'s recipes and of ``qkv translate/evaluate``) means
bf16 where the device has bf16 arithmetic and fp32 elsewhere:

- a CUDA GPU with bf16 (Ampere and later);
- a CPU with bf16 instructions that oneDNN uses: AVX512_BF16 (AMD Zen 4 and Zen 5, Intel Cooper Lake
  and later), AMX-BF16 (Intel Sapphire Rapids and later), or Arm's BF16 extension.

Everywhere else bf16 is emulated, and slow: on an AVX2 CPU without bf16 a training step of the small
model ran 20x slower in bf16 than in fp32 (benchmarks/README.md, "Two kinds of CPU"). Asked for
explicitly, bf16 still runs there, correctly, after one warning.

A CPU with AVX-512 but without AVX512_BF16 (Intel Skylake-X, Ice Lake) passes oneDNN's own bf16 check,
which emulates the arithmetic with AVX-512 instructions: "auto" takes fp32 there too.
"""

from __future__ import annotations

import functools
import os
import platform
from collections.abc import Callable
from pathlib import Path

import torch

from qkv.errors import QkvError
from qkv.errors import warn as default_warn

PRECISIONS = ("auto", "fp32", "bf16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

# The environment that makes a CPU with more features take the paths of an AVX2 CPU without bf16 (AMD
# Zen 3, Intel Haswell to Comet Lake): oneDNN's kernels (and its bf16 check), ATen's vectorised
# kernels, MKL's, and fbgemm's int8 products (which follow their own detection, not ATen's: without
# it they took AVX-512 and ran 1.5-2.8x faster than on AVX2 at 5-160 rows; session 43). Set before
# torch is imported. `.ci/run` runs the kernel, search and translate tests under it; with it, this
# CPU raised exactly the errors that a real Zen 3 raised before qkv checked its kernels.
AVX2_ENVIRONMENT = {
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    "FBGEMM_ENABLE_INSTRUCTIONS": "AVX2",
}
# The variables above, and CTranslate2's own, that change which instructions a library uses.
ISA_VARIABLES = (*AVX2_ENVIRONMENT, "CT2_FORCE_CPU_ISA")


def _cpu_capabilities() -> dict:
    """torch's map of the CPU's features (cpuinfo's flags: 'avx512_bf16', 'amx_bf16', ...), or {}
    where this torch has none."""
    get = getattr(torch.cpu, "get_capabilities", None)
    if get is None:
        return {}
    try:
        return dict(get())
    except RuntimeError:
        return {}


@functools.cache
def cpu_bf16_native() -> bool:
    """Whether this CPU computes bf16 products in hardware, through oneDNN: oneDNN must take its bf16
    path (this respects ONEDNN_MAX_CPU_ISA), and the CPU must have a bf16 arithmetic extension."""
    try:
        if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return False
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False
    capabilities = _cpu_capabilities()
    if not capabilities:
        is_avx512_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
        if is_avx512_bf16 is not None:
            return bool(is_avx512_bf16())
        # PyTorch 2.4 has neither: the kernel's flags, where Linux gives them
        return bool(KERNEL_BF16_FLAGS & _kernel_cpu_flags())
    # AVX512_BF16 and AMX-BF16 on x86, BF16 / SVE-BF16 on Arm.
    return any(value is True and name.endswith("bf16") for name, value in capabilities.items())


# /proc/cpuinfo's names for bf16 arithmetic: x86's "flags", Arm's "Features"
KERNEL_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16", "svebf16"})


def _kernel_cpu_flags() -> set[str]:
    """The first processor's flags in /proc/cpuinfo (x86's "flags", Arm's "Features"), or an empty
    set where there is no such file (not Linux) or no such line."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def bf16_native(device: str | torch.device) -> bool:
    """Whether `device` computes bf16 natively (see the module's docstring)."""
    device = torch.device(device)
    if device.type == "cuda":
        try:
            return torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # torch before 2.5 has no including_emulation
            return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return cpu_bf16_native()
    return False


_warned: set[str] = set()


def resolve_precision(
    precision: str,
    device: str | torch.device,
    warn: Callable[[str], None] | None = None,
) -> str:
    """'fp32' or 'bf16': `precision` ('auto', 'fp32' or 'bf16') on `device`. An explicit 'bf16' on a
    device without bf16 arithmetic warns, once per process and device type, and stays 'bf16'."""
    if precision not in PRECISIONS:
        raise QkvError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    native = bf16_native(device)
    if precision == "auto":
        return "bf16" if native else "fp32"
    device_type = torch.device(device).type
    if precision == "bf16" and not native and device_type not in _warned:
        _warned.add(device_type)
        (warn or default_warn)(slow_bf16_message(device))
    return precision


def slow_bf16_message(device: str | torch.device) -> str:
    device = torch.device(device)
    if device.type != "cpu":
        return (
            f"{device} has no native bf16 arithmetic: bf16 is emulated there and slower than fp32"
        )
    return (
        f"bf16 on this CPU ({cpu_name()}, {torch.backends.cpu.get_cpu_capability()}) is many times "
        "slower than fp32: it has no bf16 instructions (a training step ran 20x slower on an AMD "
        "Zen 3); precision 'auto' or 'fp32' avoids it"
    )


def precision_note(precision: str, resolved: str, device: str | torch.device) -> str:
    """One line for the start of training or translation: what runs, and why."""
    if precision == "auto":
        why = "native on" if resolved == "bf16" else "no native bf16 on"
        return f"precision {resolved} (auto: {why} {device})"
    return f"precision {resolved}"


# ---------------------------------------------------------------------------------------------------
# The CPU, named: for benchmark headers and figures


@functools.cache
def cpu_name() -> str:
    """The CPU's model name, as lscpu says it, with its x86 family and model where known."""
    fields = _proc_cpuinfo()
    name = fields.get("model name") or platform.processor() or platform.machine() or "unknown CPU"
    if "cpu family" in fields:
        name += f" (family {fields['cpu family']}, model {fields.get('model', '?')})"
    return name


def _proc_cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo ({} off Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.split("\n\n")[0].splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    return fields


def describe_cpu() -> str:
    """One line: the CPU, ATen's capability, whether bf16 is native, torch's threads, and any
    environment variable above that holds a library to fewer instructions."""
    limits = [f"{name}={os.environ[name]}" for name in ISA_VARIABLES if name in os.environ]
    return (
        f"CPU: {cpu_name()}; ATen capability {torch.backends.cpu.get_cpu_capability()}; "
        f"bf16 native: {'yes' if cpu_bf16_native() else 'no'}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads" + (f"; {' '.join(limits)}" if limits else "")
    )


def usable_device(device: str | torch.device) -> torch.device:
    """`device` as a torch.device where this machine has it, else a QkvError saying what is wrong
    with it (before, a checkpoint loaded onto a missing GPU was called "not readable")."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise QkvError(f"--device {device}: not a device; give cpu, cuda or cuda:N") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise QkvError(
                f"--device {device}: PyTorch sees no GPU here (a CPU build, or no driver)"
            )
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            count = torch.cuda.device_count()
            raise QkvError(
                f"--device {device}: this machine has {count} GPU(s), cuda:0 to cuda:{count - 1}"
            )
    elif parsed.type != "cpu":
        raise QkvError(f"--device {device}: qkv runs on cpu or cuda")
    return parsed
