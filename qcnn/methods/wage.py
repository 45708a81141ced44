"""WAGE training procedure (Wu et al., ICLR 2018; quantizers in :mod:`qcnn.quant.wage`).

WAGE trains from scratch a network without BatchNorm or biases:

1. the network: a zoo model that already has no BN and no bias is used as is; ``lenet5`` and ``vgg7``
   (with BN) are replaced by ``lenet5_wage`` / ``vgg7_wage`` of the same width, classes, input channels and
   image size (the float weights are not used: WAGE trains from its own init);
2. ``quantize(net, recipe)`` places W (with 1/alpha), A+E and the output E (recipe ``method: wage``,
   ``first_last: same`` quantizes every layer as the paper does);
3. :func:`~qcnn.quant.wage.wage_init`: ``U(-max(L, Lmin), max(L, Lmin))`` then onto the kW grid;
4. :func:`qcnn.train.fit` with the SSE loss, :class:`~qcnn.quant.wage.WageSGD` (G: quantized update with the
   learning rate inside, plain SGD; ``recipe.train.lr`` is WAGE's lr, 8 in the paper) and the step hook
   ``W <- C(W, kW)``. Bits W-A-G-E come from ``w_bits``, ``a_bits``, ``g_bits`` (default 8), ``e_bits``
   (default 8).

``procedure_params``: ``seed`` (int, init seed, default 0).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from qcnn.methods import register_procedure
from qcnn.quant.registry import get_method
from qcnn.quant.wage import WageSGD, sse_loss, wage_init
from qcnn.recipes import Recipe
from qcnn.transform import quantize

_PARAMS = {"seed"}


def _check_params(params: dict, valid: set[str], proc: str) -> None:
    bad = sorted(set(params) - valid)
    if bad:
        raise ValueError(f"unknown procedure_params {bad} for procedure {proc!r}; valid: {sorted(valid)}")


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
    import qcnn.models.wage_nets  # noqa: F401  (registers lenet5_wage / vgg7_wage)
    from qcnn.models import build_model
    from qcnn.models.lenet import LeNet5
    from qcnn.models.vgg import CifarVGG

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


def arch_of(net: nn.Module, name: str, width: float, bundle=None) -> dict:
    """The ``arch`` record (as :func:`qcnn.checkpoint.save_model` stores it) of a network a procedure built."""
    conv = _first(net, nn.Conv2d)
    last = [m for m in net.modules() if isinstance(m, nn.Linear)][-1]
    kwargs = {}
    if bundle is not None and getattr(bundle, "image_size", None) is not None and name in ("lenet5_wage", "vgg7_wage",
                                                                                           "lenet5_bireal"):
        kwargs["image_size"] = int(bundle.image_size)
    return {"name": name, "num_classes": last.out_features, "in_channels": conv.in_channels, "width": float(width),
            "kwargs": kwargs}


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
    from qcnn.train import fit

    if recipe.method != "wage":
        raise ValueError(f"procedure 'wage' needs method 'wage', the recipe has method={recipe.method!r}")
    params = dict(recipe.procedure_params)
    _check_params(params, _PARAMS, "wage")
    device = next(model.parameters()).device
    net = wage_network(model, bundle)
    qmodel = quantize(net, recipe).to(device)
    arch = None
    if net is not model:
        from qcnn.models.wage_nets import LeNet5Wage

        conv = _first(net, nn.Conv2d)
        is_lenet = isinstance(net, LeNet5Wage)
        arch = arch_of(net, "lenet5_wage" if is_lenet else "vgg7_wage", conv.out_channels / (6 if is_lenet else 128),
                       bundle)
    if not resume:
        wage_init(qmodel, torch.Generator().manual_seed(int(params.get("seed", 0))))
    method = get_method(recipe.method, recipe.params)
    metrics = fit(qmodel, bundle, recipe.train, out_dir, loss_fn=wage_loss,
                  make_optimizer=make_wage_optimizer(recipe.g_bits or 8), step_hook=method.step_hook, resume=resume)
    if arch is not None:
        metrics["arch"] = arch  # the network trained is not the one passed in
    return qmodel, metrics


__all__ = ["arch_of", "make_wage_optimizer", "wage", "wage_loss", "wage_network"]
