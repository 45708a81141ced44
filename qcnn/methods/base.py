"""The method contract and registry: how each method places quantizers on a network.

A :class:`Method` answers, for one layer described by a :class:`LayerContext`, which quantizer goes on
its weight, on the activation it consumes, and (optionally) on the gradient leaving its output. The
quantizer math lives in :mod:`qcnn.quant`; each family's ``Method`` subclass (its policy and options)
lives in ``qcnn/methods/<family>.py`` and registers itself with :func:`register_method`;
:func:`qcnn.methods.quantize` only talks to this interface, so there are no switches on method names
anywhere else.

Method-specific options are a dataclass (``Method.Options``); a recipe's ``params`` are checked against
it, and unknown keys are refused with the list of valid ones.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from qcnn.quant.base import GradientQuantizer, Quantizer
from qcnn.quant.uniform import UniformQuantizer
from qcnn.recipes import checked_fields

#: modules holding method policies; each registers its methods on import
METHOD_MODULES = (
    "qcnn.methods.qcode",
    "qcnn.methods.dorefa",
    "qcnn.methods.pact",
    "qcnn.methods.wrpn",
    "qcnn.methods.hwgq",
    "qcnn.methods.lsq",
    "qcnn.methods.wage",
    "qcnn.methods.bireal",
    "qcnn.methods.elq",
    "qcnn.methods.nonuniform",
    "qcnn.methods.clipq",
    "qcnn.methods.vnq",
    "qcnn.methods.fqn",
)

METHODS: dict[str, type[Method]] = {}


@dataclass
class LayerContext:
    """Everything a method needs to choose the quantizers of one layer."""

    name: str  #: qualified module name, e.g. ``layer1.0.conv1``
    module: nn.Module  #: the float Conv2d / Linear
    role: str  #: ``first``, ``last`` or ``hidden``
    w_bits: int
    a_bits: int
    input_signed: bool  #: the consumed activation may be negative (no ReLU in front of it)
    per_channel: bool
    calib: str  #: observer name for calibrated activation ranges
    g_bits: int | None = None
    e_bits: int | None = None
    options: Any = None  #: the method's Options instance


def _bits_text(bits: tuple[int, ...]) -> str:
    b = sorted(bits)
    if len(b) > 2 and b == list(range(b[0], b[-1] + 1)):
        return f"{b[0]}-{b[-1]}"
    return ", ".join(map(str, b))


@dataclass
class NoOptions:
    pass


class Method:
    """Base: weights and activations on a uniform grid. Subclasses override what differs.

    The defaults give the plain uniform quantizer of Jacob et al.: symmetric weights (per channel if
    asked) with the range taken from the weight itself, activations unsigned after ReLU / signed and
    asymmetric otherwise, range from the recipe's observer, kept up to date by EMA during training.
    """

    name: ClassVar[str] = "base"
    Options: ClassVar[type] = NoOptions
    #: layer types this method can quantize (subclasses included). A ConvTranspose2d's weight quantizer is given the
    #: weight in conv layout ``(out, in/groups, kH, kW)`` (:class:`~qcnn.nn.layers.QConvTranspose2d`); a method
    #: whose procedure keeps per-weight state read from the stored weight leaves it out
    supported: ClassVar[tuple[type[nn.Module], ...]] = (nn.Conv1d, nn.Conv2d, nn.ConvTranspose2d, nn.Linear)
    #: weight / activation bit widths the method defines (None = any); the benchmark marks other cells
    weight_bits: ClassVar[tuple[int, ...] | None] = None
    act_bits: ClassVar[tuple[int, ...] | None] = None
    #: False for weight-only methods (activations stay float whatever a_bits says)
    quantizes_activations: ClassVar[bool] = True
    #: True where quantized activations are part of the method itself (float activations undefined)
    requires_quantized_activations: ClassVar[bool] = False
    #: True for fixed-point (power-of-two) grids whose fractional lengths the PTQ searches may choose
    fl_search: ClassVar[bool] = False

    def __init__(self, options: Any = None):
        self.options = options if options is not None else self.Options()

    @classmethod
    def defines(cls, w_bits: int, a_bits: int | None) -> str | None:
        """None if the method defines the W/A setting, else the reason it does not."""
        if cls.weight_bits is not None and w_bits not in cls.weight_bits:
            return f"{cls.name} defines weights of {_bits_text(cls.weight_bits)} bits only"
        if a_bits is not None and not cls.quantizes_activations:
            return f"{cls.name} quantizes weights only"
        if a_bits is None and cls.requires_quantized_activations:
            return f"{cls.name} quantizes activations by design (float activations are not this method)"
        if a_bits is not None and cls.act_bits is not None and a_bits not in cls.act_bits:
            return f"{cls.name} defines activations of {_bits_text(cls.act_bits)} bits only"
        return None

    @classmethod
    def make_options(cls, params: dict | None) -> Any:
        """The method's Options from a recipe's ``params``: unknown keys and ill-typed values refused by name."""
        return cls.Options(**checked_fields(cls.Options, params, f"params of method {cls.name!r}",
                                            unknown=f"unknown option(s) for method {cls.name!r}:"))

    # -- quantizer factories -------------------------------------------------------------------
    def weight_quantizer(self, ctx: LayerContext) -> Quantizer | None:
        return UniformQuantizer(ctx.w_bits, signed=True, symmetric=True, per_channel=ctx.per_channel, dynamic=True)

    def act_quantizer(self, ctx: LayerContext) -> Quantizer | None:
        if not self.quantizes_activations:
            return None
        return self.calibrated_act(ctx.a_bits, ctx.input_signed, ctx.calib)

    def input_quantizer(self, ctx: LayerContext) -> Quantizer | None:
        """Quantizer on the network input (the first layer's activation): signed, calibrated."""
        if not self.quantizes_activations:
            return None
        return self.calibrated_act(ctx.a_bits, True, ctx.calib)

    def grad_quantizer(self, ctx: LayerContext) -> GradientQuantizer | None:
        """Optional quantizer of the gradient arriving at the layer output (DoReFa G, WAGE E)."""
        return None

    def add_quantizer(self, a_bits: int, calib: str) -> Quantizer | None:
        """Quantizer on the output of a residual add (needed for integer-only inference)."""
        if not self.quantizes_activations:
            return None
        return self.calibrated_act(a_bits, True, calib)

    def prepare(self, model: nn.Module) -> nn.Module:
        """Architecture changes a method needs before quantizers are placed (default: none)."""
        return model

    # -- training hooks (used by qcnn.methods.run_recipe) --------------------------------------
    def param_groups(self, model: nn.Module, weight_decay: float) -> list[dict] | None:
        """Optimizer parameter groups, e.g. PACT's alpha with its own L2; None = one group."""
        return None

    @staticmethod
    def own_group(model: nn.Module, default_decay: float, params: list, **group) -> list[dict]:
        """The default groups (:func:`qcnn.train.default_param_groups`, kernels decayed by ``default_decay``)
        without ``params``, which get a group of their own with the settings ``group`` (``weight_decay``,
        ``lr``, ...)."""
        from qcnn.train import default_param_groups

        ids = {id(p) for p in params}
        groups = []
        for g in default_param_groups(model, default_decay):
            rest = [p for p in g["params"] if id(p) not in ids]
            if rest:
                groups.append({**g, "params": rest})
        return groups + ([{"params": list(params), **group}] if params else [])

    def step_hook(self, model: nn.Module, step: int) -> None:
        """Called after every optimizer step (weight clipping, freezing, ...)."""

    def calibrated_act(self, bits: int, signed: bool, calib: str) -> Quantizer:
        """Uniform activation quantizer: unsigned symmetric after ReLU, signed asymmetric otherwise."""
        return UniformQuantizer(bits, signed=signed, symmetric=not signed, observer=calib, track_in_training=True)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.options})"


class EdgeUniformMethod(Method):
    """Base for the low-bit methods: first/last layers (role ``first``/``last``) at 8 or more bits use the
    base class's uniform int8 quantizers; everything else is left to the subclass's ``low_*`` factories."""

    @staticmethod
    def edge(ctx: LayerContext, bits: int) -> bool:
        return ctx.role != "hidden" and bits >= 8

    def weight_quantizer(self, ctx: LayerContext) -> Quantizer | None:
        if self.edge(ctx, ctx.w_bits):
            return super().weight_quantizer(ctx)
        return self.low_weight(ctx)

    def act_quantizer(self, ctx: LayerContext) -> Quantizer | None:
        if self.edge(ctx, ctx.a_bits):
            return super().act_quantizer(ctx)
        return self.low_act(ctx)

    def low_weight(self, ctx: LayerContext) -> Quantizer | None:
        raise NotImplementedError

    def low_act(self, ctx: LayerContext) -> Quantizer | None:
        raise NotImplementedError


def register_method(cls: type[Method]) -> type[Method]:
    if cls.name in METHODS and METHODS[cls.name] is not cls:
        raise ValueError(f"method {cls.name!r} registered twice")
    METHODS[cls.name] = cls
    return cls


@dataclass
class UniformOptions:
    #: power-of-two scales (fixed-point friendly)
    pot: bool = False
    #: weight range: ``minmax`` (the tensor's own, Jacob et al.) or ``mse`` (MSE-optimal clipping per call)
    weight_range: str = "minmax"
    #: activation grids: ``auto`` (unsigned after ReLU, signed asymmetric elsewhere) or ``symmetric`` (every
    #: activation signed and symmetric, zero point 0: TensorRT's int8 rule, ``qcnn export --onnx-form tensorrt``)
    act_grid: str = "auto"

    def __post_init__(self):
        if self.act_grid not in ("auto", "symmetric"):
            raise ValueError(f"act_grid={self.act_grid!r}: choose auto or symmetric")


class UniformMethod(Method):
    """Plain uniform affine quantization (Jacob et al. / FQN-style ranges, torch.ao-like baseline)."""

    name = "uniform"
    Options = UniformOptions
    weight_bits = tuple(range(2, 17))  # 1-bit weights are binary methods, not a symmetric uniform grid

    def weight_quantizer(self, ctx: LayerContext) -> Quantizer | None:
        return UniformQuantizer(
            ctx.w_bits, signed=True, symmetric=True, per_channel=ctx.per_channel, dynamic=True, pot=self.options.pot,
            weight_range=self.options.weight_range,
        )

    def calibrated_act(self, bits: int, signed: bool, calib: str) -> Quantizer:
        if self.options.act_grid == "symmetric":
            return UniformQuantizer(bits, signed=True, symmetric=True, observer=calib, track_in_training=True,
                                    pot=self.options.pot)
        return UniformQuantizer(
            bits, signed=signed, symmetric=not signed, observer=calib, track_in_training=True, pot=self.options.pot
        )


register_method(UniformMethod)

_loaded = False


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    for mod in METHOD_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:  # a method family not present in this build
            if e.name != mod:
                raise
    _loaded = True


def available_methods() -> list[str]:
    _load_all()
    return sorted(METHODS)


def get_method(name: str, params: dict | None = None) -> Method:
    """Instantiate the method registered as ``name`` with recipe ``params``."""
    _load_all()
    if name not in METHODS:
        raise ValueError(f"unknown quantization method {name!r}; choose one of {sorted(METHODS)}")
    cls = METHODS[name]
    return cls(cls.make_options(params))


__all__ = [
    "METHODS",
    "LayerContext",
    "Method",
    "NoOptions",
    "available_methods",
    "get_method",
    "register_method",
]
