"""The compute precision a run uses: `precision: auto` resolved for the machine it runs on.

bf16 autocast is about 1.5 to 4x faster than fp32 on a CPU with bf16 units (AVX-512 BF16, AMX) and on
a GPU that supports it, but on a CPU without them (AVX2 only: AMD Zen 3, most laptops) every bf16
matmul is emulated and about 60x slower than fp32. The precision enters the scorer's fingerprint, so
`auto` is decided from the hardware and the software alone, never from a timing: the same machine
and environment give the same answer every run. On a CPU, bf16 where the CPU flags name bf16 units
and nothing caps them: torch's ATen kernels must run at AVX-512 (`torch.backends.cpu.get_cpu_capability()`,
lowered by `ATEN_CPU_CAPABILITY`) and oneDNN's ISA must reach AVX-512 BF16 (`ONEDNN_MAX_CPU_ISA`, or
the older `DNNL_MAX_CPU_ISA`). On CUDA, bf16 where `torch.cuda.is_bf16_supported()` says so natively.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Collection, Mapping, Optional

import torch
from loguru import logger

_warned: set[str] = set()


@dataclass(frozen=True)
class Precision:
    """What `precision` resolved to on one device, and why."""

    name: str  # "bf16" or "fp32"
    reason: str

    @property
    def autocast_dtype(self) -> Optional[torch.dtype]:
        """The autocast dtype of the forward passes; None for plain fp32."""
        return torch.bfloat16 if self.name == "bf16" else None

    def to_dict(self) -> dict[str, str]:
        return {"resolved": self.name, "reason": self.reason}


def autocast(device: torch.device, dtype: Optional[torch.dtype]) -> torch.autocast:
    """Autocast to `dtype` on `device` (a `Precision.autocast_dtype`); a no-op for None, plain fp32."""
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # CPU flags of bf16 units, as /proc/cpuinfo names them
ONEDNN_ISA_VARS = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")
# oneDNN ISA caps that keep its bf16 kernels (any other value, e.g. AVX2 or AVX512_CORE, emulates bf16).
ONEDNN_BF16_ISAS = ("ALL", "DEFAULT", "AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX",
                    "AVX512_CORE_AMX_FP16", "AVX10_1_512", "AVX10_1_512_AMX", "AVX10_1_512_AMX_FP16", "AVX10_2_512",
                    "AVX10_2_512_AMX_2")


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags: those of /proc/cpuinfo (what the kernel lets programs use), else the ones
    torch's cpuinfo reports (other systems)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    try:
        capability = torch._C._cpu._get_cpu_capability()
    except AttributeError:  # an older torch: only the AVX-512 BF16 query exists
        return frozenset(["avx512_bf16"] if getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)() else [])
    return frozenset(name for name, present in capability.items() if present is True)


def aten_cpu_capability() -> str:
    """The instruction set torch's ATen kernels run at ("AVX512", "AVX2", "DEFAULT"...), as capped by
    `ATEN_CPU_CAPABILITY`."""
    return str(torch.backends.cpu.get_cpu_capability())


def cpu_bf16_decision(flags: Collection[str], aten_capability: str, env: Mapping[str, str]) -> tuple[bool, str]:
    """Whether bf16 is native on a CPU with `flags` whose ATen runs at `aten_capability`, under the
    environment `env` (the oneDNN cap), with the reason: the answer of `precision: auto` on that CPU."""
    units = [flag for flag in BF16_FLAGS if flag in flags]
    if not units:
        return False, "the CPU has no bf16 units (no avx512_bf16 or amx_bf16 flag), so bf16 would be emulated"
    if "AVX512" not in aten_capability.upper():
        return False, (f"the CPU has bf16 units ({', '.join(units)}), but torch's kernels run at "
                       f"{aten_capability} (ATEN_CPU_CAPABILITY), which emulates bf16")
    for name in ONEDNN_ISA_VARS:
        isa = env.get(name, "").strip()
        if isa and isa.upper() not in ONEDNN_BF16_ISAS:
            return False, f"the CPU has bf16 units ({', '.join(units)}), but {name}={isa} caps oneDNN below them"
    return True, f"the CPU computes bf16 natively ({', '.join(units)}; torch kernels at {aten_capability})"


@functools.lru_cache(maxsize=None)
def cpu_native_bf16() -> tuple[bool, str]:
    """`cpu_bf16_decision` for this CPU, torch and environment (read once per process, as torch and
    oneDNN read their caps once)."""
    return cpu_bf16_decision(cpu_flags(), aten_cpu_capability(), os.environ)


def cuda_bf16_supported() -> bool:
    """Whether the current GPU computes bf16 natively (not emulated, where torch can tell them apart)."""
    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # an older torch, which reports native support only
        return bool(torch.cuda.is_bf16_supported())


def reset_warnings() -> None:
    """Forget the one-time warnings and the CPU's answer, as in a fresh process."""
    _warned.clear()
    cpu_native_bf16.cache_clear()


def resolve(requested: str, device: torch.device) -> Precision:
    """The precision `requested` (`auto`, `fp32`, `bf16`) gives on `device`; warns once per process when an
    explicit `bf16` runs on a CPU that emulates it."""
    if requested == "fp32":
        return Precision("fp32", "asked for")
    if device.type == "cuda":
        if requested == "bf16":
            if not torch.cuda.is_bf16_supported():
                raise ValueError("`precision: bf16` was asked for, but this GPU does not support bf16; use auto or "
                                 "fp32.")
            return Precision("bf16", "asked for")
        if cuda_bf16_supported():
            return Precision("bf16", "the GPU supports bf16")
        return Precision("fp32", "the GPU does not compute bf16 natively")
    if device.type != "cpu":
        return Precision("bf16" if requested == "bf16" else "fp32", f"asked for {requested} on {device.type}")
    native, why = cpu_native_bf16()
    if requested == "auto":
        return Precision("bf16" if native else "fp32", why)
    if not native and "bf16" not in _warned:
        _warned.add("bf16")
        logger.warning(f"gsnr: `precision: bf16` on this CPU is about 60x slower than fp32: {why}. "
                       "Set `precision: auto` (or fp32) to run at full speed.")
    return Precision("bf16", "asked for" + ("" if native else f", though {why}"))
