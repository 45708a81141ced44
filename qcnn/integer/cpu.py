"""Which x86 int8 kernels saturate: ``vpmaddubsw`` on CPUs without VNNI.

x86 int8 GEMM / conv kernels (ONNX Runtime's MLAS, fbgemm, oneDNN) multiply uint8 activations by int8 weights
with ``vpmaddubsw`` where the CPU has no VNNI instruction: it adds each pair of adjacent products in saturating
int16, so ``x1 w1 + x2 w2`` is clamped to [-32768, 32767]. With 8-bit codes on both sides (``2 * 255 * 128 >
32767``) a conv's accumulator can be wrong. The uint8 x uint8 kernels widen to int32 first and are exact, which
is why the ONNX forms hand ONNX Runtime uint8 weights (zero point 128) on such CPUs. VNNI (``vpdpbusd``)
accumulates in int32 directly.
"""

from __future__ import annotations

import platform
import re

_X86 = ("x86_64", "amd64", "x86", "i386", "i686")


def cpu_flags() -> set[str] | None:
    """The CPU's feature flags (Linux ``/proc/cpuinfo``), None where they cannot be read."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            m = re.search(r"^flags\s*:(.*)$", f.read(), re.MULTILINE)
    except OSError:
        return None
    return set(m.group(1).split()) if m else None


def u8s8_saturates(vnni: tuple[str, ...] = ("avx512_vnni", "avx_vnni", "amx_int8")) -> bool:
    """Whether uint8 x int8 kernels add pairs of products in saturating int16 on this CPU: an x86 CPU with none
    of the ``vnni`` flags (the ones the library in question uses); assumed so on an x86 CPU whose flags cannot
    be read, never on other architectures (ARM's int8 dot products accumulate in int32)."""
    if platform.machine().lower() not in _X86:
        return False
    flags = cpu_flags()
    return flags is None or not flags.intersection(vnni)


__all__ = ["cpu_flags", "u8s8_saturates"]
