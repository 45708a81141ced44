"""Learned rounding after calibration: AdaRound (layer-wise) and BRECQ (block-wise), with QDrop's option.

Papers: Nagel et al. 2020, "Up or Down? Adaptive Rounding for Post-Training Quantization" (AdaRound);
Li et al. 2021, "BRECQ: Pushing the Limit of Post-Training Quantization by Block Reconstruction";
Wei et al. 2022, "QDrop: Randomly Dropping Quantization for Extremely Low-bit Post-Training Quantization".

Rounding. Every quantized layer keeps its weight grid (scale ``s``, zero point ``z``, codes ``[q_min, q_max]``,
read from ``weight_quant.grid()``: per tensor or per channel, uniform or power-of-two) and learns, per weight,
whether to round down or up::

    W~ = s * (clip(floor(W / s) + h(V) + z, q_min, q_max) - z)
    h(V) = clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1),   zeta = 1.1, gamma = -0.1   (rectified sigmoid)

``V`` starts where ``h(V) = W/s - floor(W/s)`` (so the first forward is the float weight, up to clipping), and
is the only trained tensor (Adam, ``lr``; by default ``max(4e-3, 10 / iterations)``: Adam moves each ``V`` by
about ``lr`` per step, and a variable that starts in the middle (``V = 0``) needs ``|V| >= 2.3`` to reach
``h`` 0.01 or 0.99, so a short schedule needs a larger step; 4e-3 is BRECQ's, for its 20 000 iterations).
The loss of a unit (a layer, or a block of layers) is::

    L = || f(x) - f~(x~) ||^2  +  lambda sum_i (1 - |2 h(V_i) - 1|^beta)

with the reconstruction term summed over the output channels and averaged over the mini-batch and the
spatial positions (BRECQ's ``lp_loss``, ``(pred - tgt)^2 .sum(1).mean()``: the scale for which ``lambda =
0.01`` was tuned; summed over all ``C H W`` output elements instead, the reconstruction outweighs the
regulariser ``H W`` times, up to 12 544x on MobileNetV2's 112x112 maps, and most ``h`` stay undecided:
measured 63-89 % of them strictly inside (0.01, 0.99) after 500 iterations on its first nine layers, 0-8 %
with this scale and the default ``lr`` below), ``f`` the float unit on the float
model's input, ``f~`` the quantized unit (soft-rounded weights, calibrated activation quantizers) on the
quantized model's input ``x~`` with every earlier unit already rounded (sequential, in graph order). The
regulariser is off for the first ``warmup`` fraction of the iterations (20 %), then ``beta`` decays linearly
from 20 to 2 (the paper's schedule), driving every ``h`` to 0 or 1. At the end the rounding is made hard,
``h = [V >= 0]``, the layer's weight is overwritten with ``W~`` (on the grid) and its quantizer keeps that grid:
a dynamic :class:`~qcnn.quant.uniform.UniformQuantizer` is :meth:`frozen <qcnn.quant.uniform.UniformQuantizer.
freeze>` (it would otherwise recompute its scale from ``W~``), a fixed-point QCode's ``fl`` is fixed already.
So ``weight_quant(W~) == W~`` and the model in eval mode reproduces the learned rounding exactly.

Units. ``mode="layer"`` (AdaRound): one unit per quantized layer; its output is the layer's, or the output of
the ReLU / ReLU6 that is the layer's only consumer (AdaRound's ``f`` = the activation, where there is one; the
pre-activation output otherwise). ``mode="block"`` (BRECQ): the layers of a block are optimised jointly on the
block's output. Blocks come from module names (:func:`block_groups`): ``torch.fx`` inlines the blocks (their
modules are not called in the graph), but keeps the dotted names of the leaf modules. Layers are grouped by
their first ``depth`` name components (``layer1.0.conv1`` -> ``layer1.0`` at depth 2; a name with at most
``depth`` components is its own group). The automatic depth is the deepest at which some group of two or more
layers contains a merge (an add / concat: a residual block); each group is then named by the shortest prefix
that holds the same layers (``features.3.conv`` -> ``features.3`` in MobileNetV2). A block's region of the graph
is every node from its first to its last owned node (call_module targets under the prefix, so the residual add
and the shortcut between them belong to it), followed by adds whose inputs are all in the block or its inputs
(MobileNetV2's ``x + conv(x)``) and activations applied to its output. A region must have a single output and
contain no other unit's layer; otherwise its layers fall back to layer units. A block runs as an fx
sub-GraphModule of the quantized model sharing its layers.

Kernel sums (``keep_dc=True``): when a unit ends, before the rounding is made hard, the least certain decisions
(smallest ``|V|``) of each spatial kernel slice flip until the slice's code sum is within half a step of its float
sum (:mod:`qcnn.methods.kernel_sums`: the DC gain that a flat input sees, which the reconstruction loss on a few
images leaves up to several steps off).

QDrop (``drop_prob = p > 0``): every element of the unit's input is, independently at each step, the float
model's value with probability ``p`` (and then not activation-quantized by the unit's first layers either) or
the quantized model's value (quantized as usual): ``x = where(u < p, x_float, Q(x_quant))``, ``u ~ U(0, 1)``.

Activation steps (``act_lr > 0``; off by default): every activation quantizer of the unit's region (the
layers' input slots and the residual adds' output slots) that is a calibrated uniform grid per tensor (not
power-of-two: a QCode step stays a power of two) learns its step ``s`` jointly with the rounding, as BRECQ and
QDrop do for low-bit activations (their code: Adam, lr 4e-5, cosine decay to 0), through LSQ's gradient
(Esser et al. 2020; :func:`qcnn.quant.lsq.lsq_codes`)::

    x_q = s (round(clip(v, q_min, q_max)) - z),   v = x / s + z
    dx_q/ds = round(v) - v  for q_min <= v <= q_max,   q_min - z below,   q_max - z above

with the zero point ``z`` kept. Its own Adam (``act_lr``, cosine-annealed to 0 over the iterations); the learned
step is written into the quantizer's ``scale`` when the unit ends, so later units see it.

Data: the quantized inputs, float inputs (QDrop only) and float outputs of one unit are cached for every
sample of ``batches`` (no graph kept), the unit is optimised on random mini-batches of ``batch_size``
samples (fewer where a sample is large: at most ``max_elements`` elements per mini-batch tensor), then the
caches are dropped. The activation quantization of a cached input by the layers that read it is computed once,
not at every step (a learned step's, at every step). Activation quantizers change only through ``act_lr``
(the model stays in eval mode).

Limitations: the model must be the fx GraphModule of :func:`qcnn.methods.quantize` (BN folded, as PTQ does);
weight quantizers must map their own grid points onto themselves (uniform, fixed-point, LSQ-like grids);
activation quantizers are the layers' and residual adds' slots; a layer called twice (shared weights) is refused.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor, fx, nn

from qcnn.methods.kernel_sums import sum_moves
from qcnn.nn.layers import QConv2d, QLinear
from qcnn.quant.base import Grid, Quantizer
from qcnn.quant.lsq import EPS, lsq_codes
from qcnn.quant.uniform import UniformQuantizer
from qcnn.transform import float_twin, fold_bn, is_relu

ZETA, GAMMA = 1.1, -0.1
MODES = ("layer", "block")
#: default cap on the elements of a unit's largest mini-batch tensor (2^20: ResNet-20 keeps 32 CIFAR samples
#: per step, MobileNetV2's 112x112 layers one ImageNet sample)
MAX_BATCH_ELEMENTS = 1 << 20
_Q_LAYERS = (QConv2d, QLinear)
#: quantizer slots of the quantized modules (removed in the float twin)


@dataclass
class AdaRoundReport:
    """What :func:`adaround` returns."""

    mode: str  #: ``layer`` (AdaRound) or ``block`` (BRECQ)
    layers: list[str] = field(default_factory=list)  #: the rounded layers, in graph order
    blocks: list[list[str]] = field(default_factory=list)  #: the layers of each unit, in processing order
    recon_mse_nearest: dict[str, float] = field(default_factory=dict)  #: unit -> output MSE, nearest rounding
    recon_mse_learned: dict[str, float] = field(default_factory=dict)  #: unit -> output MSE, learned rounding
    flipped: dict[str, float] = field(default_factory=dict)  #: layer -> fraction of codes != nearest rounding
    #: layer -> fraction of rounding variables still undecided (``0.01 < h < 0.99``) when its optimisation ends,
    #: where the soft solution and the hard rounding it is replaced by can differ
    undecided: dict[str, float] = field(default_factory=dict)
    #: activation quantizer (``module.slot``) -> (calibrated step, learned step), with ``act_lr > 0``
    act_steps: dict[str, tuple[float, float]] = field(default_factory=dict)
    seconds: float = 0.0  #: wall time of the whole pass
    units: list[str] = field(default_factory=list)  #: the unit names (keys of the MSE dicts), as ``blocks``


@dataclass
class _Config:
    iterations: int
    lr: float
    reg: float
    beta: tuple[float, float]
    warmup: float
    drop_prob: float
    batch_size: int
    max_elements: int | None
    act_lr: float = 0.0
    keep_dc: bool = False


@dataclass
class _Unit:
    name: str
    layers: list[str]  #: quantized layers optimised together
    nodes: list[str]  #: the region's graph nodes, in graph order
    inputs: list[str]  #: nodes outside the region that it reads
    output: str  #: the region's single output node


# -- the rounding module --------------------------------------------------------------------------------
class AdaRoundWeight(nn.Module):
    """Stands in for a layer's weight quantizer during reconstruction: returns the soft-rounded
    ``s (clip(floor(W/s) + h(V) + z, q_min, q_max) - z)`` of the weight it was built from (its argument is
    ignored), or the hard rounding ``h = [V >= 0]`` with ``hard=True``."""

    def __init__(self, w: Tensor, grid: Grid):
        super().__init__()
        w = w.detach()
        shape = [1] * w.dim()
        if grid.axis is not None and grid.scale.dim() > 0:
            shape[grid.axis] = -1
        s = grid.scale.to(w.device, w.dtype).reshape(shape)
        z = torch.zeros((), device=w.device) if grid.zero_point is None else grid.zero_point
        self.register_buffer("s", s)
        self.register_buffer("z", z.to(w.device, w.dtype).reshape(shape if z.numel() > 1 else []))
        self.register_buffer("base", torch.floor(w / s))
        rest = w / s - self.base
        self.v = nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))
        self.register_buffer("nearest_codes", torch.clamp(torch.round(w / s) + self.z, grid.qmin, grid.qmax))
        self.register_buffer("float_codes", w / s + self.z)
        self.qmin, self.qmax = grid.qmin, grid.qmax
        self.hard = False

    def h(self) -> Tensor:
        return torch.clamp(torch.sigmoid(self.v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)

    def codes(self) -> Tensor:
        h = (self.v >= 0).to(self.base.dtype) if self.hard else self.h()
        return torch.clamp(self.base + h + self.z, self.qmin, self.qmax)

    def forward(self, _w: Tensor | None = None) -> Tensor:
        return self.s * (self.codes() - self.z)

    def regularizer(self, beta: float) -> Tensor:
        return (1 - (2 * self.h() - 1).abs().pow(beta)).sum()

    @torch.no_grad()
    def keep_sums(self) -> None:
        """With ``hard`` set: flip the least certain decisions (smallest ``|V|``) so that each kernel slice's
        code sum is within half a step of its float sum (:mod:`qcnn.methods.kernel_sums`); a weight with one
        tap per slice (1x1 convolution, linear layer) is left as it is."""
        if self.v.dim() < 3 or self.v[0, 0].numel() < 2:
            return
        taps = self.v[0, 0].numel()
        up = (self.v >= 0).reshape(-1, taps)
        c = self.codes().reshape(-1, taps)
        v, margin = self.float_codes.reshape(-1, taps), self.v.abs().reshape(-1, taps)
        moves = sum_moves(v, c, margin, margin, ~up & (c < self.qmax) & (c < v), up & (c > self.qmin) & (c > v))
        flat = self.v.view(-1, taps)
        flat[moves > 0] = 0.0  # h = [V >= 0] = 1
        flat[moves < 0] = -1e-6


#: the activation-quantizer slots of the quantized modules whose steps ``act_lr`` learns
_ACT_SLOTS = ("input_quant", "out_quant")


class LearnedActStep(nn.Module):
    """Stands in for a calibrated per-tensor uniform activation quantizer while its unit is reconstructed:
    ``s (round(clip(x / s + z, q_min, q_max)) - z)`` with the step ``s`` a parameter (LSQ gradient, module
    docstring) and the zero point ``z`` fixed."""

    def __init__(self, inner: UniformQuantizer):
        super().__init__()
        self.inner = inner
        self.step = nn.Parameter(inner.scale.detach().clone().float())
        self.register_buffer("z", inner.zero_point.detach().clone().float())
        self.qn, self.qp = -inner.qmin, inner.qmax

    def forward(self, x: Tensor) -> Tensor:
        zs = self.z * self.step
        return lsq_codes(x + zs, self.step, self.qn, self.qp, grad_scale=1.0) - zs

    @staticmethod
    def eligible(q: nn.Module | None) -> bool:
        """A calibrated, static, per-tensor, free-scale uniform grid."""
        return (type(q) is UniformQuantizer and not q.dynamic and not q.pot and q.axis is None
                and q.is_initialized() and q.scale.dim() == 0)


# -- units: layers and blocks of the graph ---------------------------------------------------------------
def _graph_module(qmodel: nn.Module) -> fx.GraphModule:
    if not isinstance(qmodel, fx.GraphModule):
        raise ValueError(f"adaround needs the torch.fx GraphModule that qcnn.methods.quantize returns, got "
                         f"{type(qmodel).__name__} (a model fx could not trace)")
    return qmodel


def _weight_layers(gm: fx.GraphModule) -> list[str]:
    """Names of the quantized layers (a weight quantizer) in graph order; a layer called twice is refused."""
    modules = dict(gm.named_modules())
    names: list[str] = []
    for node in gm.graph.nodes:
        m = modules.get(node.target) if node.op == "call_module" else None
        if isinstance(m, _Q_LAYERS) and m.weight_quant is not None:
            if node.target in names:
                raise ValueError(f"adaround: layer {node.target!r} is called more than once (shared weights)")
            names.append(node.target)
    return names


def _owned(node: fx.Node, prefix: str) -> bool:
    return node.op == "call_module" and (node.target == prefix or node.target.startswith(prefix + "."))


def _absorb_tail(region: list[fx.Node], nodes: list[fx.Node], modules, merges: bool) -> None:
    """Append the activation that is the region's last node's only consumer, and (``merges``) adds whose
    inputs are all in the region or read by it, while they come next in graph order."""
    pos = {n: i for i, n in enumerate(nodes)}
    inside = set(region)
    while pos[region[-1]] + 1 < len(nodes):
        nxt, last = nodes[pos[region[-1]] + 1], region[-1]
        act = is_relu(nxt, modules) and list(last.users) == [nxt]
        reads = set(nxt.all_input_nodes)
        outside = {a for n in region for a in n.all_input_nodes} | inside
        merge = merges and len(reads) >= 2 and reads <= outside
        if not (act or merge):
            return
        region.append(nxt)
        inside.add(nxt)


def _make_unit(gm: fx.GraphModule, name: str, layers: list[str], block: bool, quantized: set[str]) -> _Unit | None:
    """The graph region of ``layers`` (see module docstring), or None if it is not a single-output region
    holding exactly these quantized layers."""
    nodes = [n for n in gm.graph.nodes if n.op != "output"]
    modules = dict(gm.named_modules())
    owned = [i for i, n in enumerate(nodes) if (_owned(n, name) if block else n.target in layers and
                                                n.op == "call_module")]
    if not owned:
        return None
    region = nodes[owned[0]: owned[-1] + 1]
    _absorb_tail(region, nodes, modules, merges=block)
    inside = set(region)
    consts = [a for n in region for a in n.all_input_nodes if a not in inside and a.op == "get_attr"]
    region = list(dict.fromkeys(consts)) + region
    inside |= set(consts)
    inputs = list(dict.fromkeys(a for n in region for a in n.all_input_nodes if a not in inside))
    outs = [n for n in region if any(u not in inside for u in n.users)]
    held = {n.target for n in region if n.op == "call_module" and n.target in quantized}
    if len(outs) != 1 or held != set(layers):
        return None
    return _Unit(name, list(layers), [n.name for n in region], [n.name for n in inputs], outs[0].name)


def _prefix(name: str, depth: int) -> str:
    return ".".join(name.split(".")[:depth])


def _groups_at(names: list[str], depth: int) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for n in names:
        groups.setdefault(_prefix(n, depth), []).append(n)
    return groups


def _has_merge(gm: fx.GraphModule, unit: _Unit | None) -> bool:
    if unit is None:
        return False
    nodes = {n.name: n for n in gm.graph.nodes}
    return any(len(nodes[n].all_input_nodes) >= 2 for n in unit.nodes)


def _auto_depth(gm: fx.GraphModule, names: list[str]) -> int:
    """The deepest name depth at which a group of two or more layers holds a merge (a residual block)."""
    deepest = max((len(n.split(".")) for n in names), default=1)
    quantized = set(names)
    for depth in range(deepest, 0, -1):
        for prefix, layers in _groups_at(names, depth).items():
            if len(layers) >= 2 and _has_merge(gm, _make_unit(gm, prefix, layers, True, quantized)):
                return depth
    return deepest


def _label(prefix: str, layers: list[str], names: list[str]) -> str:
    """The shortest prefix of ``prefix`` whose layers are exactly ``layers``."""
    parts = prefix.split(".")
    for d in range(1, len(parts) + 1):
        p = ".".join(parts[:d])
        if [n for n in names if n == p or n.startswith(p + ".")] == layers:
            return p
    return prefix


def block_groups(qmodel: nn.Module, depth: int | None = None) -> dict[str, list[str]]:
    """``{block name: its quantized layers}`` in graph order, grouping layer names by their first ``depth``
    components (None: automatic, see module docstring). For the CIFAR ResNets: ``conv1``, ``layer1.0`` ..
    ``layer3.2``, ``linear``; for MobileNetV2: ``features.0``, ``features.1`` .. ``features.18``,
    ``classifier``."""
    gm = _graph_module(qmodel)
    names = _weight_layers(gm)
    if depth is None:
        depth = _auto_depth(gm, names)
    elif isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ValueError(f"block depth={depth!r} must be a positive integer")
    return {_label(p, layers, names): layers for p, layers in _groups_at(names, depth).items()}


def _units(gm: fx.GraphModule, mode: str) -> list[_Unit]:
    names = _weight_layers(gm)
    quantized = set(names)
    groups = {n: [n] for n in names} if mode == "layer" else block_groups(gm)
    units: list[_Unit] = []
    for label, layers in groups.items():
        unit = _make_unit(gm, label, layers, mode == "block", quantized)
        units.extend([unit] if unit is not None else [_make_unit(gm, n, [n], False, quantized) for n in layers])
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    return sorted(units, key=lambda u: order[u.nodes[-1]])


def _check_layers(gm: fx.GraphModule, names: list[str]) -> None:
    """Refuse, before anything changes, a layer whose weight grid AdaRound cannot learn a rounding on."""
    for name in names:
        m = gm.get_submodule(name)
        q = m.weight_quant
        kind = type(q).__name__
        if hasattr(m, "folded"):
            raise ValueError(f"adaround: layer {name!r} ({type(m).__name__}) folds BatchNorm at run time: "
                             "quantize with fold_bn=True")
        probe = copy.deepcopy(q)
        with torch.no_grad():
            wq = probe(m.weight.detach())
            if isinstance(probe, UniformQuantizer):
                probe.freeze()
            try:
                grid = probe.grid()
            except NotImplementedError:
                grid = None
            if grid is None or grid.levels is not None or grid.scale is None:
                raise ValueError(f"adaround: layer {name!r} has a {kind} weight quantizer whose grid is not "
                                 "uniform (codebook levels): learned rounding needs a uniform grid")
            if not torch.equal(probe(wq), wq):
                raise ValueError(f"adaround: layer {name!r}: the {kind} weight quantizer does not map its own "
                                 "grid points onto themselves, so a rounded weight would not survive it")


# -- float twin and caches ------------------------------------------------------------------------------
def _float_twin(gm: fx.GraphModule, float_model: nn.Module | None) -> fx.GraphModule:
    """``gm`` without quantizers (same graph and node names) holding ``float_model``'s weights (with its
    BatchNorm folded when ``gm`` has none left); None: ``gm``'s own current weights."""
    twin = float_twin(gm)
    if float_model is not None:
        if _has_bn(float_model) and not _has_bn(gm):  # quantized from the BN-folded model
            float_model = fold_bn(copy.deepcopy(float_model).eval())
        ref = dict(float_model.named_modules())
        for name, m in twin.named_modules():
            if isinstance(m, _Q_LAYERS):
                _copy_weights(name, m, ref.get(name))
    return twin


def _has_bn(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _copy_weights(name: str, dst: nn.Module, src: nn.Module | None) -> None:
    w = getattr(src, "weight", None)
    if w is None or w.shape != dst.weight.shape:
        raise ValueError(f"adaround: the float model has no layer {name!r} with weight shape "
                         f"{tuple(dst.weight.shape)} (pass the float model the quantized one was made from)")
    with torch.no_grad():
        dst.weight.copy_(w)
        b = getattr(src, "bias", None)
        if dst.bias is not None:
            dst.bias.copy_(b if b is not None else torch.zeros_like(dst.bias))


def _prefix_module(gm: fx.GraphModule, wanted: list[str]) -> fx.GraphModule:
    """A GraphModule returning the tuple of the nodes named ``wanted`` (nothing after the last of them)."""
    graph, env, left = fx.Graph(), {}, set(wanted)
    for node in gm.graph.nodes:
        if not left or node.op == "output":
            break
        env[node.name] = graph.node_copy(node, lambda a: env[a.name])
        left.discard(node.name)
    graph.output(tuple(env[n] for n in wanted))
    run = fx.GraphModule(gm, graph)
    run.graph.eliminate_dead_code()
    run.recompile()
    return run


def _region_module(gm: fx.GraphModule, unit: _Unit) -> fx.GraphModule:
    """The unit's region as a GraphModule of its inputs (its modules are ``gm``'s own)."""
    nodes = {n.name: n for n in gm.graph.nodes}
    graph = fx.Graph()
    env = {nodes[n]: graph.placeholder(f"in{i}") for i, n in enumerate(unit.inputs)}
    for n in unit.nodes:
        env[nodes[n]] = graph.node_copy(nodes[n], lambda a: env[a])
    graph.output(env[nodes[unit.output]])
    return fx.GraphModule(gm, graph)


@torch.no_grad()
def _collect(gm: fx.GraphModule, wanted: list[str], xs: list[Tensor]) -> list[Tensor]:
    """The values of the nodes ``wanted`` on every input batch, concatenated over the samples."""
    run = _prefix_module(gm, wanted)
    outs: list[list[Tensor]] = [[] for _ in wanted]
    for x in xs:
        for acc, v, name in zip(outs, run(x), wanted):
            if not isinstance(v, Tensor) or v.dim() == 0 or v.shape[0] != x.shape[0]:
                raise ValueError(f"adaround: graph value {name!r} is not a per-sample tensor")
            acc.append(v.detach())
    return [torch.cat(o) for o in outs]


@dataclass
class _Cache:
    q_in: list[Tensor]
    f_in: list[Tensor] | None
    target: Tensor

    @property
    def n(self) -> int:
        return self.target.shape[0]

    def batch(self, idx: Tensor, p: float, gen: torch.Generator) -> tuple[list[Tensor], list[Tensor | None]]:
        xs = [t[idx] for t in self.q_in]
        if not p:
            return xs, [None] * len(xs)
        masks = [(torch.rand(x.shape, generator=gen) < p).to(x.device) for x in xs]
        return [torch.where(m, f[idx], x) for m, f, x in zip(masks, self.f_in, xs)], masks


def _cache(gm: fx.GraphModule, twin: fx.GraphModule, unit: _Unit, xs: list[Tensor], qdrop: bool) -> _Cache:
    q_in = _collect(gm, unit.inputs, xs)
    f_vals = _collect(twin, (unit.inputs if qdrop else []) + [unit.output], xs)
    return _Cache(q_in, f_vals[:-1] if qdrop else None, f_vals[-1])


# -- optimisation ---------------------------------------------------------------------------------------
class _InputQuant(nn.Module):
    """Stands in for the activation quantizer of a layer that reads a unit input directly: returns the input's
    quantized value computed once for the whole cache (``current``: the mini-batch's rows), except where
    ``mask`` is set (QDrop: those elements keep the float value they were given)."""

    def __init__(self, inner: nn.Module, index: int):
        super().__init__()
        self.inner, self.index = inner, index
        self.cached: Tensor | None = None
        self.current: Tensor | None = None
        self.mask: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        ok = self.current is not None and self.current.shape == x.shape
        y = self.current if ok else self.inner(x)
        return y if self.mask is None or self.mask.shape != x.shape else torch.where(self.mask, x, y)


def _input_quants(gm: fx.GraphModule, unit: _Unit, cache: _Cache, bs: int) -> list[tuple[nn.Module, _InputQuant]]:
    """(layer, stand-in) for every layer of the region whose activation quantizer reads a unit input
    directly, with that input's quantized value cached."""
    nodes = {n.name: n for n in gm.graph.nodes}
    index = {nodes[n]: i for i, n in enumerate(unit.inputs)}
    out = []
    for name in unit.nodes:
        node = nodes[name]
        m = gm.get_submodule(node.target) if node.op == "call_module" else None
        src = node.args[0] if node.args else None
        if isinstance(m, _Q_LAYERS) and isinstance(m.input_quant, (Quantizer, LearnedActStep)) \
                and isinstance(src, fx.Node) and src in index:
            stand_in = _InputQuant(m.input_quant, index[src])
            x = cache.q_in[stand_in.index]
            if not isinstance(m.input_quant, LearnedActStep):  # a learned step changes at every step
                with torch.no_grad():
                    stand_in.cached = torch.cat([m.input_quant(x[i: i + bs]) for i in range(0, len(x), bs)])
            out.append((m, stand_in))
    return out


def _beta(t: int, warm: int, cfg: _Config) -> float:
    rel = (t - warm) / max(1, cfg.iterations - warm)
    return cfg.beta[1] + (cfg.beta[0] - cfg.beta[1]) * max(0.0, 1.0 - rel)


def _unit_batch(cfg: _Config, cache: _Cache) -> int:
    """Samples per step: ``batch_size``, fewer where a sample's largest tensor (an input or the output) has
    so many elements that the mini-batch would exceed ``max_elements`` (big early activations)."""
    bs = min(cfg.batch_size, cache.n)
    if cfg.max_elements is None:
        return bs
    per_sample = max(t[0].numel() for t in [*cache.q_in, cache.target])
    return max(1, min(bs, cfg.max_elements // per_sample))


def _optimise(region: nn.Module, rounders: list[AdaRoundWeight], cache: _Cache, wrappers, cfg: _Config,
              gen: torch.Generator, act_steps: list[LearnedActStep]) -> None:
    opt = torch.optim.Adam([r.v for r in rounders], lr=cfg.lr)
    act_opt = torch.optim.Adam([a.step for a in act_steps], lr=cfg.act_lr) if act_steps else None
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(act_opt, cfg.iterations, eta_min=0.0) if act_opt else None
    bs, warm = _unit_batch(cfg, cache), int(cfg.warmup * cfg.iterations)
    for t in range(cfg.iterations):
        idx = torch.randperm(cache.n, generator=gen)[:bs].to(cache.target.device)
        xs, masks = cache.batch(idx, cfg.drop_prob, gen)
        for _, w in wrappers:
            w.current, w.mask = (None if w.cached is None else w.cached[idx]), masks[w.index]
        out = region(*xs)
        loss = (out - cache.target[idx]).pow(2).sum(1).mean()  # over channels; mean over samples and positions
        if t >= warm and cfg.reg:
            beta = _beta(t, warm, cfg)
            loss = loss + cfg.reg * sum(r.regularizer(beta) for r in rounders)
        opt.zero_grad(set_to_none=True)
        if act_opt is not None:
            act_opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if act_opt is not None:
            act_opt.step()
            sched.step()


@torch.no_grad()
def _recon_mse(region: nn.Module, cache: _Cache, bs: int) -> float:
    total = 0.0
    for i in range(0, cache.n, bs):
        out = region(*[t[i: i + bs] for t in cache.q_in])
        total += float((out - cache.target[i: i + bs]).double().pow(2).sum())
    return total / cache.target.numel()


def _install(layer: nn.Module) -> AdaRoundWeight:
    """Replace the layer's weight quantizer by a rounder on the grid it uses now."""
    with torch.no_grad():
        layer.weight_quant(layer.weight)  # a dynamic grid follows the current weight
    r = AdaRoundWeight(layer.weight, layer.weight_quant.grid())
    layer._adaround_quant, layer.weight_quant = layer.weight_quant, r
    return r


def _uninstall(layer: nn.Module, done: bool, keep_dc: bool = False) -> tuple[float, float]:
    """Put the layer's quantizer back; when ``done``, with the hard-rounded weight (each kernel's sum kept
    with ``keep_dc``) and the grid frozen. Returns the fractions of codes that differ from nearest rounding and
    of rounding variables undecided."""
    r, q = layer.weight_quant, layer._adaround_quant
    layer.weight_quant = q
    del layer._adaround_quant
    if not done:
        return 0.0, 0.0
    with torch.no_grad():
        h = r.h()
        undecided = float(((h > 0.01) & (h < 0.99)).double().mean())
        r.hard = True
        if keep_dc:
            r.keep_sums()
        layer.weight.copy_(r())
        flipped = float((r.codes() != r.nearest_codes).double().mean())
    if isinstance(q, UniformQuantizer):
        q.freeze()
    return flipped, undecided


def _install_act_steps(gm: fx.GraphModule, unit: _Unit) -> list[tuple[nn.Module, str, str, LearnedActStep]]:
    """(module, slot, name, stand-in) for every eligible activation quantizer of the unit's region."""
    nodes = {n.name: n for n in gm.graph.nodes}
    out, seen = [], set()
    for node in (nodes[n] for n in unit.nodes):
        if node.op != "call_module" or node.target in seen:
            continue
        seen.add(node.target)
        m = gm.get_submodule(node.target)
        for slot in _ACT_SLOTS:
            q = getattr(m, slot, None)
            if LearnedActStep.eligible(q):
                stand_in = LearnedActStep(q)
                setattr(m, slot, stand_in)
                out.append((m, slot, f"{node.target}.{slot}", stand_in))
    return out


def _uninstall_act_steps(installed, done: bool, report: AdaRoundReport) -> None:
    for m, slot, name, stand_in in installed:
        q = stand_in.inner
        setattr(m, slot, q)
        if done:
            with torch.no_grad():
                before = float(q.scale)
                q.scale.copy_(stand_in.step.detach().abs().clamp_min(EPS).to(q.scale.dtype))
            report.act_steps[name] = (before, float(q.scale))


def _run_unit(gm, twin, unit: _Unit, xs, cfg: _Config, gen, report: AdaRoundReport, log) -> None:
    t0 = time.perf_counter()
    cache = _cache(gm, twin, unit, xs, cfg.drop_prob > 0)
    region = _region_module(gm, unit)
    report.recon_mse_nearest[unit.name] = _recon_mse(region, cache, cfg.batch_size)
    layers = [gm.get_submodule(n) for n in unit.layers]
    acts = _install_act_steps(gm, unit) if cfg.act_lr else []
    rounders, wrappers, done = [], [], False
    try:
        wrappers = _input_quants(gm, unit, cache, cfg.batch_size)
        rounders = [_install(m) for m in layers]
        for m, w in wrappers:
            m.input_quant = w
        _optimise(region, rounders, cache, wrappers, cfg, gen, [a[3] for a in acts])
        done = True
    finally:
        for m, w in wrappers:
            m.input_quant = w.inner
        _uninstall_act_steps(acts, done, report)
        for name, m in zip(unit.layers[:len(rounders)], layers):
            report.flipped[name], report.undecided[name] = _uninstall(m, done, cfg.keep_dc)
    report.recon_mse_learned[unit.name] = _recon_mse(region, cache, cfg.batch_size)
    if log is not None:
        log(f"  {report.mode} {unit.name}: output MSE nearest {report.recon_mse_nearest[unit.name]:.4g} -> "
            f"learned {report.recon_mse_learned[unit.name]:.4g}, flipped "
            f"{sum(report.flipped[n] for n in unit.layers) / len(unit.layers):.1%} ({time.perf_counter() - t0:.1f} s)")


# -- entry point ----------------------------------------------------------------------------------------
def default_lr(iterations: int) -> float:
    """The default Adam step of the rounding variables: ``max(4e-3, 10 / iterations)`` (module docstring)."""
    return max(4e-3, 10.0 / iterations)


def _check_args(mode, iterations, lr, reg, beta, warmup, drop_prob, batch_size, max_elements,
                act_lr=0.0, keep_dc=False) -> _Config:
    if mode not in MODES:
        raise ValueError(f"adaround: unknown mode {mode!r}; choose one of {MODES}")
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations <= 0:
        raise ValueError(f"adaround: iterations={iterations!r} must be a positive integer")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"adaround: batch_size={batch_size!r} must be a positive integer")
    if max_elements is not None and (isinstance(max_elements, bool) or not isinstance(max_elements, int)
                                     or max_elements <= 0):
        raise ValueError(f"adaround: max_elements={max_elements!r} must be a positive integer or None")
    if not (isinstance(drop_prob, (int, float)) and 0.0 <= drop_prob < 1.0):
        raise ValueError(f"adaround: drop_prob={drop_prob!r} must lie in [0, 1)")
    lr = default_lr(iterations) if lr is None else lr
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"adaround: lr={lr!r} must be positive")
    if isinstance(act_lr, bool) or not (isinstance(act_lr, (int, float)) and math.isfinite(act_lr) and act_lr >= 0):
        raise ValueError(f"adaround: act_lr={act_lr!r} must be >= 0 (0: activation steps stay calibrated)")
    if not (math.isfinite(reg) and reg >= 0):
        raise ValueError(f"adaround: reg={reg!r} must be >= 0")
    if not (0.0 <= warmup < 1.0):
        raise ValueError(f"adaround: warmup={warmup!r} must lie in [0, 1)")
    if len(beta) != 2 or not all(math.isfinite(b) and b > 0 for b in beta):
        raise ValueError(f"adaround: beta={beta!r} must be two positive numbers (start, end)")
    return _Config(iterations, float(lr), float(reg), (float(beta[0]), float(beta[1])), float(warmup),
                   float(drop_prob), batch_size, max_elements, float(act_lr), bool(keep_dc))


def _inputs(batches, device) -> list[Tensor]:
    xs = [(b[0] if isinstance(b, (tuple, list)) else b) for b in batches]
    if not xs or not all(isinstance(x, Tensor) and x.dim() > 0 and x.shape[0] > 0 for x in xs):
        raise ValueError("adaround: the calibration set is empty (or not a list of tensors / (x, y) batches)")
    return [x.to(device) for x in xs]


def adaround(qmodel: nn.Module, float_model: nn.Module | None, batches, mode: str = "layer",
             iterations: int = 1000, lr: float | None = None, reg: float = 0.01, beta=(20.0, 2.0), warmup: float = 0.2,
             drop_prob: float = 0.0, batch_size: int = 32, seed: int = 0, log=None,
             max_elements: int | None = MAX_BATCH_ELEMENTS, act_lr: float = 0.0,
             keep_dc: bool = False) -> AdaRoundReport:
    """Learn the rounding of every quantized layer of the calibrated ``qmodel`` in place (see module
    docstring): ``mode="layer"`` is AdaRound, ``mode="block"`` BRECQ; ``drop_prob`` > 0 adds QDrop.

    ``float_model`` is the float model ``qmodel`` was quantized from (BatchNorm folded or not; layer names
    must match), or None to take ``qmodel``'s own current weights as the float reference. ``batches`` are the
    calibration inputs (tensors or ``(x, y)`` pairs). Each step draws ``batch_size`` cached samples, fewer
    for a unit whose per-sample input or output exceeds ``max_elements / batch_size`` elements (None: never).
    ``act_lr > 0`` also learns the steps of the units' per-tensor uniform activation quantizers (module
    docstring; BRECQ / QDrop use 4e-5 with 20 000 iterations). ``keep_dc`` keeps each spatial kernel's sum
    through the hard rounding (:mod:`qcnn.methods.kernel_sums`). Deterministic for a given ``seed``.
    """
    cfg = _check_args(mode, iterations, lr, reg, beta, warmup, drop_prob, batch_size, max_elements, act_lr,
                      keep_dc)
    gm = _graph_module(qmodel)
    names = _weight_layers(gm)
    _check_layers(gm, names)
    device = next(iter(gm.parameters())).device
    xs = _inputs(batches, device)
    start = time.perf_counter()
    units = _units(gm, mode)
    report = AdaRoundReport(mode, layers=names, blocks=[u.layers for u in units], units=[u.name for u in units])
    twin = _float_twin(gm, float_model)
    grads = {p: p.requires_grad for p in gm.parameters()}
    gen = torch.Generator().manual_seed(seed)
    try:
        gm.eval()
        for p in grads:
            p.requires_grad_(False)
        for unit in units:
            _run_unit(gm, twin, unit, xs, cfg, gen, report, log)
    finally:
        for p, g in grads.items():
            p.requires_grad_(g)
        gm.eval()
    report.seconds = time.perf_counter() - start
    return report


__all__ = ["AdaRoundReport", "AdaRoundWeight", "GAMMA", "LearnedActStep", "MAX_BATCH_ELEMENTS", "MODES", "ZETA",
           "adaround", "block_groups", "default_lr"]
