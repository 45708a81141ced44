"""CPU feature detection for the saturating uint8 x int8 kernels."""

from __future__ import annotations

import io

import qcnn.integer.cpu as cpu


def _fake_cpuinfo(monkeypatch, text):
    real_open = open

    def fake(f, *a, **k):
        if f == "/proc/cpuinfo":
            if text is None:
                raise OSError("no /proc")
            return io.StringIO(text)
        return real_open(f, *a, **k)

    monkeypatch.setattr("builtins.open", fake)


def test_saturation_follows_the_vnni_flags(monkeypatch):
    monkeypatch.setattr(cpu.platform, "machine", lambda: "x86_64")
    info = "processor\t: 0\nflags\t\t: fpu sse2 avx2 {}\nbugs\t\t: spectre_v1 avx512_vnni\n"
    for extra, expect in (("avx512f avx512bw", True), ("avx512f avx512_vnni", False), ("avx_vnni", False)):
        _fake_cpuinfo(monkeypatch, info.format(extra))
        assert cpu.u8s8_saturates() is expect, extra
    _fake_cpuinfo(monkeypatch, info.format("avx_vnni"))  # fbgemm does not use AVX-VNNI
    assert cpu.u8s8_saturates(("avx512_vnni", "amx_int8")) is True
    _fake_cpuinfo(monkeypatch, None)
    assert cpu.cpu_flags() is None and cpu.u8s8_saturates() is True
    monkeypatch.setattr(cpu.platform, "machine", lambda: "aarch64")
    assert cpu.u8s8_saturates() is False
