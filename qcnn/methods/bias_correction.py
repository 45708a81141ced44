"""Bias correction: remove the mean output shift that weight (and input) quantization adds to every layer.

Nagel et al., "Data-Free Quantization Through Weight Equalization and Bias Correction", ICCV 2019, sec. 4.2.
With the quantization error of the weights ``eps = W~ - W`` a layer's output ``y~ = W~ x`` is biased:
``E[y~] - E[y] = eps E[x]`` (per output channel, summed over the kernel), and the error of every earlier
layer adds to it through ``x``. Subtracting the shift from the bias makes the output unbiased again:
``b <- b - (E[y~] - E[y])``.

* **empirical** (:func:`empirical_bias_correction`): ``E[y~]`` and ``E[y]`` are measured on calibration
  batches, layer by layer in graph order, ``E[y~]`` on the quantized model with every earlier layer already
  corrected, ``E[y]`` on its float twin (:func:`qcnn.transform.float_twin`: the same modules, every
  quantizer removed). This covers weight and activation quantization error alike. Cost: one pass over the
  batches per layer.
* **analytic** (:func:`analytic_bias_correction`, the paper's data-free form): ``E[x]`` of a layer whose input
  comes straight from a BatchNorm'd convolution ``k`` (through an optional ReLU / ReLU6 and shape-only
  ops) follows from that BatchNorm: the folded output of channel ``c`` is ``N(beta_c, gamma_c^2)``, so
  ``E[x_c] = mu`` (no activation), ``f(mu, sigma)`` after a ReLU and ``f(mu, sigma) - f(mu - 6, sigma)``
  after a ReLU6, with ``f(m, s) = m Phi(m / s) + s phi(m / s)`` (the mean of a clipped normal). If
  cross-layer equalization rescaled channel ``c`` of ``k`` by ``t_c`` and high-bias absorption moved its
  bias, ``mu = beta_c t_c + (b_c - b_fold_c t_c)`` and ``sigma = |gamma_c| t_c``. Then
  ``b <- b - eps E[x]`` (for padding-free positions; zero padding makes the shift slightly smaller near the
  border). Layers whose input has no such BatchNorm (the first layer, inputs of residual adds or pools of
  several branches) are corrected empirically.

Both leave the weights and the quantizers alone and change biases only; a layer without a bias gets one
(:func:`ensure_biases`, also applied when a checkpoint of such a model is rebuilt).
"""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, fx, nn

from qcnn.nn.layers import QConv2d, QLinear
from qcnn.transform import _is_passthrough, clip_bounds, float_twin, fold_bn, is_relu, layers_in_order, trace

_Q_LAYERS = (QConv2d, QLinear)


def ensure_biases(model: nn.Module) -> list[str]:
    """Give every quantized layer without a bias a zero bias; returns their names."""
    added = []
    for name, m in model.named_modules():
        if isinstance(m, _Q_LAYERS) and m.bias is None:
            m.bias = nn.Parameter(torch.zeros(m.weight.shape[0], device=m.weight.device, dtype=m.weight.dtype))
            added.append(name)
    return added


def _layer_names(qmodel: nn.Module) -> list[str]:
    gm = qmodel if isinstance(qmodel, fx.GraphModule) else None
    return [n for n, _ in layers_in_order(qmodel, gm) if isinstance(qmodel.get_submodule(n), _Q_LAYERS)]


def _channel_sum(y: Tensor) -> Tensor:
    """Sum over every dim except channels (dim 1), as float64."""
    return y.double().transpose(0, 1).reshape(y.shape[1], -1).sum(1)


@torch.no_grad()
def output_means(model: nn.Module, names: list[str], batches) -> dict[str, Tensor]:
    """Per-channel mean output of each layer in ``names`` over ``batches`` (one pass, forward hooks)."""
    sums: dict[str, Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name):
        def fn(_mod, _inp, out):
            sums[name] = sums.get(name, 0) + _channel_sum(out)
            counts[name] = counts.get(name, 0) + out.numel() // out.shape[1]
        return fn

    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    try:
        model.eval()
        for x, _ in batches:
            model(x)
    finally:
        for h in handles:
            h.remove()
    return {n: sums[n] / counts[n] for n in names if n in sums}


@torch.no_grad()
def empirical_bias_correction(qmodel: nn.Module, float_model: nn.Module, batches,
                              layers: list[str] | None = None) -> dict[str, float]:
    """Correct ``qmodel``'s biases in place (see module docstring); ``float_model`` is its float twin (same
    module names). Returns ``{layer: max |shift removed|}``."""
    names = _layer_names(qmodel) if layers is None else layers
    ensure_biases(qmodel)
    ref = output_means(float_model, names, batches)
    shifts = {}
    for name in names:
        m = qmodel.get_submodule(name)
        if m.weight_quant is None and m.input_quant is None:
            continue
        delta = output_means(qmodel, [name], batches)[name] - ref[name]
        m.bias.sub_(delta.to(m.bias.dtype))
        shifts[name] = float(delta.abs().max())
    return shifts


def bn_stats_by_conv(model: nn.Module) -> dict[str, tuple[Tensor, Tensor]]:
    """``{conv name: (beta, |gamma|)}`` for every Conv2d of the float ``model`` followed only by a BatchNorm2d:
    the mean and standard deviation of that conv's BN-folded output per channel."""
    gm = trace(model)
    if gm is None:
        return {}
    modules = dict(gm.named_modules())
    out = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], nn.Conv2d) or len(node.users) != 1:
            continue
        user = next(iter(node.users))
        if user.op == "call_module" and isinstance(modules[user.target], nn.BatchNorm2d):
            bn = modules[user.target]
            out[node.target] = (bn.bias.detach().double().clone(), bn.weight.detach().double().abs().clone())
    return out


def _upper(hi: float | Tensor) -> float | Tensor:
    return hi.detach().double() if isinstance(hi, Tensor) else hi


def _producer(node: fx.Node, modules: dict[str, nn.Module]) -> tuple[str | None, float | None]:
    """(conv feeding ``node``'s input through shape-only ops and at most one ReLU-like node, its clip)."""
    src, upper = node.args[0] if node.args else None, None
    while isinstance(src, fx.Node):
        if src.op == "call_module" and isinstance(modules[src.target], nn.Conv2d):
            return src.target, upper
        if is_relu(src, modules) and upper is None:
            upper = _upper(clip_bounds(src, modules)[1])
        elif not (_is_passthrough(src, modules) and not _is_pool(src, modules)):
            return None, None
        src = src.args[0] if src.args else None
    return None, None


def _is_pool(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Max pooling changes the mean: only shape-only ops and average pools keep ``E[x]``."""
    if node.op == "call_module":
        return isinstance(modules[node.target], nn.MaxPool2d)
    return node.target is torch.nn.functional.max_pool2d


def clipped_normal_mean(mu: Tensor, sigma: Tensor, upper: float | Tensor | None) -> Tensor:
    """``E[clip(X, 0, upper)]`` for ``X ~ N(mu, sigma^2)`` (``upper=None``: no clip; ``inf``: ReLU; a tensor:
    one bound per channel)."""
    if upper is None:
        return mu

    def f(m):  # E[max(0, X)] for X ~ N(m, sigma^2)
        s = sigma.clamp(min=1e-12)
        z = m / s
        normal = torch.distributions.Normal(torch.zeros_like(z), torch.ones_like(z))
        return m * normal.cdf(z) + s * normal.log_prob(z).exp()

    if not isinstance(upper, Tensor) and math.isinf(upper):
        return f(mu)
    return f(mu) - f(mu - upper)


def _input_mean(qmodel, name, producer, upper, stats, folded) -> Tensor:
    """E[x] of layer ``name`` from the BN statistics of its producer (rescaled by CLE / moved by absorption)."""
    beta, gamma = stats[producer]
    now, before = qmodel.get_submodule(producer), folded.get_submodule(producer)
    dims = tuple(range(1, now.weight.dim()))
    t = (now.weight.detach().double().abs().amax(dims) / before.weight.detach().double().abs().amax(dims)
         .clamp(min=1e-30))
    b_now = now.bias.detach().double() if now.bias is not None else torch.zeros_like(t)
    b_fold = before.bias.detach().double() if before.bias is not None else torch.zeros_like(t)
    return clipped_normal_mean(beta * t + (b_now - b_fold * t), gamma * t, upper)


def _weight_shift(m: nn.Module, ex: Tensor) -> Tensor:
    """``eps E[x]`` per output channel, ``eps = W~ - W`` summed over the kernel."""
    eps = (m.quantized_weight() - m.weight).detach().double()
    if isinstance(m, nn.Conv2d):
        eps = eps.sum(dim=(2, 3))
        if m.groups > 1:  # depthwise / grouped: each output channel sees its group's inputs
            per = m.in_channels // m.groups
            ex_g = ex.reshape(m.groups, per).repeat_interleave(m.out_channels // m.groups, 0)
            return (eps * ex_g).sum(1)
    return eps @ ex


@torch.no_grad()
def analytic_bias_correction(qmodel: nn.Module, float_model: nn.Module, batches=None) -> dict[str, str]:
    """Correct ``qmodel``'s biases in place from the BatchNorm statistics of the original float ``model``
    where its graph allows, empirically elsewhere (needs ``batches``; see module docstring). Returns
    ``{layer: "analytic" | "empirical"}``."""
    stats = bn_stats_by_conv(float_model)
    folded = fold_bn(copy.deepcopy(float_model).eval())
    modules = dict(qmodel.named_modules())
    nodes = {n.target: n for n in qmodel.graph.nodes if n.op == "call_module"} if isinstance(
        qmodel, fx.GraphModule) else {}
    ensure_biases(qmodel)
    twin = float_twin(qmodel) if batches is not None else None  # the float reference, before any change
    how, rest = {}, []
    for name in _layer_names(qmodel):
        m = modules[name]
        producer, upper = _producer(nodes[name], modules) if name in nodes else (None, None)
        if producer in stats and m.weight_quant is not None:
            m.bias.sub_(_weight_shift(m, _input_mean(qmodel, name, producer, upper, stats, folded)).to(m.bias.dtype))
            how[name] = "analytic"
        else:
            rest.append(name)
    if rest and batches is not None:
        empirical_bias_correction(qmodel, twin, batches, layers=rest)
        how.update({n: "empirical" for n in rest})
    return how


__all__ = ["analytic_bias_correction", "bn_stats_by_conv", "clipped_normal_mean", "empirical_bias_correction",
           "ensure_biases", "output_means"]
