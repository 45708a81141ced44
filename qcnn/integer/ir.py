"""The integer IR: activation grids and integer operations (what the compiler emits and every backend reads).

An :class:`IntegerModel` (:mod:`qcnn.integer.runtime`) is a flat list of :class:`Op`. Each op has a ``kind``
(``quantize``, ``conv``, ``linear``, ``requant``, ``add``, ``clamp``, ``maxpool``, ``sumpool``, ``reshape``,
``getitem``, ``pad``, ``permute``, ``concat``, ``mul``, ``lut``, ``affine``, ``dequantize``), the names of its
input values and of its output value, ``attrs`` (JSON values only: ints, floats, strings, lists, dicts; written as
they are to the ``.json`` file) and ``tensors`` (written to the ``.npz`` file). The meaning of every attribute and
tensor is listed in docs/integer.md; :mod:`qcnn.integer.kernels` gives the reference semantics.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from torch import Tensor, nn

from qcnn.quant.base import Quantizer


@dataclass(frozen=True)
class ActGrid:
    """Per-tensor uniform activation grid ``v = scale * (q - zero_point)``, ``q in [qmin, qmax]``."""

    scale: float
    zero_point: int
    qmin: int
    qmax: int
    bits: int

    @classmethod
    def from_quantizer(cls, q: nn.Module, where: str) -> ActGrid:
        if not isinstance(q, Quantizer):
            raise ValueError(f"{where}: {type(q).__name__} is not a quantizer with a grid; integer inference needs "
                             "every layer input quantized (recipe first_last '8bit' or 'same', no skipped layers)")
        if not q.is_initialized():
            raise ValueError(f"{where}: quantizer is not calibrated; calibrate or train the model first")
        g = q.grid()
        if not g.is_uniform or g.scale is None:
            raise ValueError(f"{where}: {type(q).__name__} has a non-uniform grid; the integer engine supports "
                             "uniform (scale, zero point) activation grids only")
        if g.scale.numel() != 1:
            raise ValueError(f"{where}: per-channel activation grids are not supported (scale shape "
                             f"{tuple(g.scale.shape)})")
        zp = int(g.zero_point.reshape(-1)[0]) if g.zero_point is not None else 0
        return cls(float(np.float32(g.scale.reshape(-1)[0].item())), zp, int(g.qmin), int(g.qmax), int(g.bits))

    @property
    def inv_scale(self) -> float:
        return float(np.float32(1.0) / np.float32(self.scale))

    @property
    def centred_bound(self) -> int:
        """Largest ``|q - zero_point|`` of a code on the grid."""
        return max(abs(self.qmin - self.zero_point), abs(self.qmax - self.zero_point))

    def code(self, v: float) -> int:
        """Code of the real value ``v`` the way the fake-quant kernels compute it (float32, ties to even)."""
        q = float(np.rint(np.float32(v) * np.float32(self.inv_scale))) + self.zero_point
        return int(min(max(q, self.qmin), self.qmax))

    def to_json(self) -> dict:
        return {"scale": self.scale, "zero_point": self.zero_point, "qmin": self.qmin, "qmax": self.qmax,
                "bits": self.bits}


@dataclass
class Op:
    """One integer operation: ``kind``, input value names, output value name, JSON attributes, tensors."""

    kind: str
    inputs: list[str]
    output: str
    attrs: dict = field(default_factory=dict)
    tensors: dict[str, Tensor] = field(default_factory=dict)


def operand_zero_points(op: Op) -> list[int]:
    """Zero point subtracted from each input of a ``requant`` / ``add`` before its multiplier."""
    if op.kind == "add":
        return list(op.attrs["input_zero_points"])
    return [op.attrs.get("input_zero_point", 0)]


def operand_tensors(op: Op, name: str) -> list[Tensor] | None:
    """The per-operand tensors ``name`` of a ``requant`` (``name``) / ``add`` (``name0``, ``name1``, ...);
    None where the op has none."""
    if op.kind == "add":
        keys = [f"{name}{i}" for i in range(len(op.inputs))]
    else:
        keys = [name]
    if not all(k in op.tensors for k in keys):
        return None
    return [op.tensors[k] for k in keys]


# -- slicing indices in JSON ---------------------------------------------------------------------------------
def index_to_json(idx) -> list:
    """JSON form of a ``__getitem__`` index: slices as ``[start, stop, step]``, ``"..."``, None, ints."""
    if not isinstance(idx, tuple):
        idx = (idx,)
    out = []
    for s in idx:
        if isinstance(s, slice):
            out.append([s.start, s.stop, s.step])
        elif s is Ellipsis:
            out.append("...")
        elif s is None or isinstance(s, int):
            out.append(s)
        else:
            raise ValueError(f"unsupported index {s!r} in a slicing node")
    return out


def index_from_json(spec) -> tuple:
    """Inverse of :func:`index_to_json`."""
    out = []
    for s in spec:
        if isinstance(s, list):
            out.append(slice(*s))
        elif s == "...":
            out.append(Ellipsis)
        elif s is None:
            out.append(None)
        else:
            out.append(int(s))
    return tuple(out)


__all__ = ["ActGrid", "Op", "index_from_json", "index_to_json", "operand_tensors", "operand_zero_points"]
