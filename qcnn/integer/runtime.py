"""The compiled integer model: :class:`IntegerModel` runs its ops in order on int64 tensors."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from qcnn.integer import serialize
from qcnn.integer.ir import Op
from qcnn.integer.kernels import run_op


class IntegerModel(nn.Module):
    """A compiled integer-only network: ``ops`` run in order on int64 tensors.

    ``points`` maps each quantizer of the source model (``<module>.input_quant``, ``<qadd>.out_quant``) to the
    value that holds its codes, so the codes can be compared with the fake-quant simulation.
    """

    def __init__(self, ops: list[Op], input_name: str, output_names: list[str], points: dict[str, str],
                 input_shape: tuple[int, ...], meta: dict | None = None):
        super().__init__()
        self.ops = ops
        self.input_name = input_name
        self.output_names = output_names
        self.points = points
        self.input_shape = tuple(input_shape)
        self.meta = dict(meta or {})
        self._cache: dict = {}

    @torch.no_grad()
    def run(self, x: Tensor, force: dict[str, Tensor] | None = None, record: bool = False):
        """Run on float input ``x``. ``force`` replaces the codes of the named quantizer points (teacher
        forcing, to test each layer on exactly the simulation's inputs); ``codes`` (with ``record``) are the
        codes the engine computed at each point, before any forcing. Returns ``(outputs, codes)``."""
        env: dict[str, Tensor] = {self.input_name: x}
        codes: dict[str, Tensor] = {}
        key_to_points: dict[str, list[str]] = {}
        for p, k in self.points.items():
            key_to_points.setdefault(k, []).append(p)
        for op in self.ops:
            y = run_op(op, [env[i] for i in op.inputs], self._cache)
            if record:
                for p in key_to_points.get(op.output, ()):
                    codes[p] = y
            if force:
                for p in key_to_points.get(op.output, ()):
                    if p in force:
                        y = force[p].to(y.device, torch.int64)
            env[op.output] = y
        outs = [env[n] for n in self.output_names]
        return (outs[0] if len(outs) == 1 else outs), codes

    def forward(self, x: Tensor) -> Tensor:
        return self.run(x)[0]

    @torch.no_grad()
    def value_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shape of every value for a batch of one (runs the model on zeros)."""
        env: dict[str, Tensor] = {self.input_name: torch.zeros((1,) + self.input_shape)}
        for op in self.ops:
            env[op.output] = run_op(op, [env[i] for i in op.inputs], {})
        return {k: tuple(v.shape) for k, v in env.items()}

    # -- plain-file export (qcnn.integer.serialize) ---------------------------------------------------------
    def describe(self) -> dict:
        """JSON-able description of the graph (tensors are referenced by their npz key)."""
        return serialize.describe(self.ops, self.input_name, self.output_names, self.points, self.input_shape,
                                  self.meta)

    def save(self, path: str | Path) -> tuple[Path, Path]:
        """Write ``<path>.npz`` (integer weights, biases, multipliers, shifts, scales) and ``<path>.json``."""
        return serialize.write(self.describe(), self.ops, path)

    @classmethod
    def load(cls, path: str | Path) -> IntegerModel:
        """Load a model written by :meth:`save` (needs only the ``.npz`` and ``.json`` files)."""
        return cls(**serialize.read(path))


__all__ = ["IntegerModel"]
