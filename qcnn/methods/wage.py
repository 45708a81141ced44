"""WAGE training procedure (Wu et al., ICLR 2018; quantizers in :mod:`qcnn.quant.wage`).

WAGE trains from scratch a network without BatchNorm or biases:

1. the network: a zoo model that already has no BN and no bias is used as is; ``lenet5`` and ``vgg7``
   (with BN) are replaced by ``lenet5_wage`` / ``vgg7_wage`` of the same width, classes, input channels and
   image size (the float weights are not used: WAGE trains from its own init);
2. ``quantize(net, recipe)`` places W (with 1/alpha), A+E and the output E (recipe ``method: wage``,
   ``first_last: same`` quantizes every layer as the paper does);
3. :func:`~qcnn.quant.wage.wage_init`: ``U(-max(L, Lmin), max(L, Lmin))`` then onto the kW grid;
4. :func:`qcnn.train.fit` with the SSE loss, :class:`~qcnn.methods.wage.WageSGD` (G: quantized update with the
   learning rate inside, plain SGD; ``recipe.train.lr`` is WAGE's lr, 8 in the paper) and the step hook
   ``W <- C(W, kW)``. Bits W-A-G-E come from ``w_bits``, ``a_bits``, ``g_bits`` (default 8), ``e_bits``
   (default 8).

``procedure_params``: ``seed`` (int, init seed, default 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import qcnn.models.wage_nets  # noqa: F401  (registers lenet5_wage / vgg7_wage)
from qcnn.methods import procedure_params, register_procedure
from qcnn.methods.base import LayerContext, Method, get_method, register_method
from qcnn.methods.place import quantize
from qcnn.models import build_model
from qcnn.models.lenet import LeNet5
from qcnn.models.vgg import CifarVGG
from qcnn.quant.base import Quantizer, check_bits
from qcnn.quant.wage import (
    WageActQuantizer,
    WageErrorQuantizer,
    WageWeightQuantizer,
    fan_in_of,
    layer_limits,
    wage_c,
    wage_q,
    wage_update,
)
from qcnn.recipes import Recipe
from qcnn.train import fit


class WageSGD(torch.optim.Optimizer):
    """Plain SGD with WAGE's quantized update: ``W <- C(W - dW, kW)``, ``dW = wage_update(g, lr, kG)``.

    Parameter groups may set ``w_bits`` (clip range; ``None`` = no clip, e.g. float BN in a non-WAGE net)
    and ``g_bits``.
    """

    def __init__(self, params, lr: float = 8.0, g_bits: int = 8, w_bits: int | None = 2):
        check_bits(g_bits, "g_bits", 1, 16)
        if lr <= 0:
            raise ValueError(f"lr={lr!r} must be positive")
        super().__init__(params, dict(lr=lr, g_bits=g_bits, w_bits=w_bits))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                p.sub_(wage_update(p.grad, group["lr"], group["g_bits"]))
                if group["w_bits"] is not None:
                    p.copy_(wage_c(p, group["w_bits"]))
        return loss


def sse_loss(logits: Tensor, y: Tensor) -> Tensor:
    """``0.5 * sum_c (onehot(y) - out)^2``, averaged over the batch."""
    onehot = F.one_hot(y, logits.shape[1]).to(logits.dtype)
    return 0.5 * (onehot - logits).pow(2).sum(1).mean()


def wage_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Layers carrying a :class:`WageWeightQuantizer`."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(getattr(m, "weight_quant", None), WageWeightQuantizer)]


@torch.no_grad()
def wage_init(model: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
    """Initialise every WAGE layer: ``U(-max(L, Lmin), max(L, Lmin))`` then ``W <- C(Q(W, kW), kW)``
    (the official code quantizes W once at the start)."""
    for _, m in wage_layers(model):
        k = m.weight_quant.bits
        lim = max(layer_limits(m.weight_quant.fan_in, k))
        w = torch.empty(m.weight.shape, dtype=m.weight.dtype).uniform_(-lim, lim, generator=generator)
        m.weight.copy_(wage_c(wage_q(w, k), k).to(m.weight.device))
        if m.bias is not None:
            m.bias.zero_()
    return model


@torch.no_grad()
def wage_clip_(model: nn.Module) -> None:
    """``W <- C(W, kW)`` for every WAGE layer."""
    for _, m in wage_layers(model):
        m.weight.copy_(wage_c(m.weight, m.weight_quant.bits))


@dataclass
class WageOptions:
    #: quantize the network input with A (the code maps images to [-1, 1] and quantizes them); off by default
    #: because qcnn inputs are mean/std-normalised and A would clip them at 1 - sigma(kA)
    quantize_input: bool = False


@register_method
class WageMethod(Method):
    """WAGE (module docstring): W, A and E quantizers on every layer; G lives in :class:`WageSGD` (procedure
    ``wage`` in :mod:`qcnn.methods.wage`)."""

    requires_quantized_activations = True
    name = "wage"
    Options = WageOptions

    def weight_quantizer(self, ctx: LayerContext) -> Quantizer | None:
        return WageWeightQuantizer(min(ctx.w_bits, 15), fan_in=fan_in_of(ctx.module))

    def act_quantizer(self, ctx: LayerContext) -> Quantizer | None:
        return WageActQuantizer(min(ctx.a_bits, 15), ctx.e_bits if ctx.e_bits is not None else 8)

    def input_quantizer(self, ctx: LayerContext) -> Quantizer | None:
        return WageActQuantizer(min(ctx.a_bits, 15), None) if self.options.quantize_input else None

    def grad_quantizer(self, ctx: LayerContext):
        if ctx.role == "last":
            return WageErrorQuantizer(ctx.e_bits if ctx.e_bits is not None else 8)
        return None

    def add_quantizer(self, a_bits: int, calib: str) -> Quantizer | None:
        return WageActQuantizer(min(a_bits, 15), None)

    def step_hook(self, model: nn.Module, step: int) -> None:
        wage_clip_(model)


_PARAMS = {"seed"}


def _has_bn_or_bias(model: nn.Module) -> bool:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            return True
        if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
            return True
    return False


def _first(model: nn.Module, cls) -> nn.Module:
    return next(m for m in model.modules() if isinstance(m, cls))


def wage_network(model: nn.Module, bundle=None) -> nn.Module:
    """The BN-free, bias-free network WAGE trains for ``model`` (see module docstring)."""
    if not _has_bn_or_bias(model):
        return model

    conv = _first(model, nn.Conv2d)
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    kw = dict(num_classes=last.out_features, in_channels=conv.in_channels)
    if bundle is not None and getattr(bundle, "image_size", None) is not None:
        kw["image_size"] = bundle.image_size
    if isinstance(model, LeNet5):
        return build_model("lenet5_wage", width=conv.out_channels / 6, **kw)
    if isinstance(model, CifarVGG) and len([m for m in model.classifier if isinstance(m, nn.Linear)]) == 2:
        return build_model("vgg7_wage", width=conv.out_channels / 128, **kw)
    raise ValueError(
        f"WAGE trains networks without BatchNorm and biases; {type(model).__name__} has them and has no WAGE "
        "variant (use --model lenet5, vgg7, lenet5_wage or vgg7_wage)"
    )


def wage_loss(model: nn.Module, x, y):
    logits = model(x)
    return sse_loss(logits, y), logits


def make_wage_optimizer(g_bits: int):
    """``make_optimizer`` for :func:`qcnn.train.fit`: WageSGD with ``spec.lr`` (momentum/decay ignored)."""

    def make(param_groups, spec) -> torch.optim.Optimizer:
        groups = param_groups
        if isinstance(groups, list) and groups and isinstance(groups[0], dict):
            groups = [{"params": g["params"]} for g in groups]
        return WageSGD(groups, lr=spec.lr, g_bits=g_bits, w_bits=None)

    return make


@register_procedure("wage")
def wage(model: nn.Module, bundle, recipe: Recipe, out_dir: str | Path | None = None,
         resume: bool = False) -> tuple[nn.Module, dict]:
    """WAGE from scratch (module docstring); returns (quantized model, fit metrics)."""

    if recipe.method != "wage":
        raise ValueError(f"procedure 'wage' needs method 'wage', the recipe has method={recipe.method!r}")
    params = procedure_params(recipe, _PARAMS, "wage")
    device = next(model.parameters()).device
    net = wage_network(model, bundle)
    qmodel = quantize(net, recipe).to(device)
    if not resume:
        wage_init(qmodel, torch.Generator().manual_seed(int(params.get("seed", 0))))
    method = get_method(recipe.method, recipe.params)
    metrics = fit(qmodel, bundle, recipe.train, out_dir, loss_fn=wage_loss,
                  make_optimizer=make_wage_optimizer(recipe.g_bits or 8), step_hook=method.step_hook, resume=resume)
    return qmodel, metrics


__all__ = ["make_wage_optimizer", "wage", "wage_loss", "wage_network"]
