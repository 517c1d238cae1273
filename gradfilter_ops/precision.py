"""The compute precision a run uses: `precision: auto` resolved for the machine it runs on.

bf16 autocast is about 1.5 to 4x faster than fp32 on a CPU with bf16 units (AVX-512 BF16, AMX) and on
a GPU that supports it, but on a CPU without them (AVX2 only: AMD Zen 3, most laptops) every bf16
matmul is emulated and about 60x slower than fp32. So `auto` picks bf16 on a CPU only where torch
reports the units *and* a tiny timed matmul confirms that bf16 is faster there (an ISA capped by
`ONEDNN_MAX_CPU_ISA`, a VM that hides the units); the probe takes a few milliseconds and runs once
per process.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Optional

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


def cpu_bf16_units() -> bool:
    """Whether torch sees bf16 units on this CPU (AVX-512 BF16 or AMX BF16)."""
    try:
        capability = torch._C._cpu._get_cpu_capability()
    except AttributeError:  # an older torch: only the AVX-512 BF16 query exists
        return bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)())
    return bool(capability.get("avx512_bf16") or capability.get("amx_bf16"))


def bf16_matmul_speedup(size: int = 256, rounds: int = 3) -> float:
    """fp32 time over bf16 time of one small matmul on this CPU (> 1: bf16 is faster)."""
    a, b = torch.randn(size, 2 * size), torch.randn(2 * size, 2 * size)
    timings = []
    for x, y in ((a, b), (a.bfloat16(), b.bfloat16())):
        x @ y  # warm-up: kernel selection and first-touch
        started = time.perf_counter()
        for _ in range(rounds):
            x @ y
        timings.append(time.perf_counter() - started)
    return timings[0] / max(timings[1], 1e-9)


@functools.lru_cache(maxsize=None)
def cpu_native_bf16() -> tuple[bool, str]:
    """Whether bf16 is native and faster than fp32 on this CPU, with the evidence."""
    if not cpu_bf16_units():
        return False, "the CPU has no bf16 units (no AVX-512 BF16 or AMX), so bf16 would be emulated"
    speedup = bf16_matmul_speedup()
    if speedup < 1.25:
        return False, f"the CPU reports bf16 units, but a bf16 matmul ran {speedup:.2f}x the speed of fp32 here"
    return True, f"the CPU computes bf16 natively ({speedup:.1f}x the speed of fp32 in a probe matmul)"


def reset_warnings() -> None:
    """Forget the one-time warnings and the CPU probe's answer, as in a fresh process."""
    _warned.clear()
    cpu_native_bf16.cache_clear()


def resolve(requested: str, device: torch.device) -> Precision:
    """The precision `requested` (`auto`, `fp32`, `bf16`) gives on `device`; warns once per process when an
    explicit `bf16` runs on a CPU that emulates it."""
    if requested == "fp32":
        return Precision("fp32", "asked for")
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return Precision("bf16", "asked for" if requested == "bf16" else "the GPU supports bf16")
        if requested == "bf16":
            raise ValueError("`precision: bf16` was asked for, but this GPU does not support bf16; use auto or fp32.")
        return Precision("fp32", "the GPU does not support bf16")
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
