"""Bi-Real Net two-step training (Liu et al., ECCV 2018; quantizers in :mod:`qcnn.quant.binary`).

1. **Network.** A Bi-Real model from the zoo (``bireal_resnet20/32/44/56``, ``bireal_resnet18``,
   ``lenet5_bireal``) is used as is. A real-valued zoo model is mapped to its Bi-Real variant of the same
   depth, width and classes and its weights are *transferred by name*: every parameter and buffer whose
   qualified name and shape are the same in both networks is copied (``resnet<d>`` -> ``bireal_resnet<d>``
   for ``d`` in 20/32/44/56: stem, all 3x3 convs and their BNs, classifier; the new 1x1 downsample convs keep
   their init; ``lenet5`` -> ``lenet5_bireal``: every conv/linear and BN1/BN2, the new BN3/BN4 start at
   identity; ``tv:resnet18`` -> ``bireal_resnet18``). The copied and the freshly initialised names are
   returned in the metrics (``transferred``, ``initialised``). The Bi-Real network is built by its zoo
   factory, which records the arguments that rebuild it (:func:`qcnn.models.arch_record`); the quantized
   model keeps that record, so ``qcnn qat`` saves ``model.pt`` under the true architecture
   and :func:`qcnn.checkpoint.load_model` rebuilds it, whatever the depth.
2. **Real-valued pretraining** with ``clip(-1, x, 1)`` activations (the Bi-Real networks' ``Hardtanh``)
   for ``pretrain_epochs`` epochs (cross-entropy, ``recipe.train`` optimizer settings). The paper
   initialises the binary network from a real-valued network *trained to convergence* with these
   activations; from a ReLU checkpoint this stage is what adapts the weights to the clip (and trains the new
   BN/1x1 layers), so by default it gets as many epochs as the binary stage (below).
3. **Binarization**: ``quantize(net, recipe)`` (sign/ApproxSign activations, magnitude-aware binary
   weights), calibration of any non-binary first/last layer, then ``binary_epochs`` epochs of training.
4. **BN-only retraining** (the official recipe's last stage, one epoch there): every parameter except
   BatchNorm weight/bias is frozen and ``bn_epochs`` epochs re-fit BN (statistics and affine) to the binary
   network.

``procedure_params``: ``pretrain_epochs``, ``binary_epochs``, ``bn_epochs``, ``bn_lr`` (default
``recipe.train.lr``). The stages not given share ``T = recipe.train.epochs`` (:func:`split_epochs`)::

    bn_epochs       = 1 if T >= 3 else 0                  (the official single BN epoch)
    pretrain_epochs = floor((T - bn_epochs) / 2)          (half of what BN leaves; 0 only for T <= 1)
    binary_epochs   = T - pretrain_epochs - bn_epochs     (the rest, >= 0)

e.g. ``T = 3 -> 1/1/1``, ``T = 5 -> 2/2/1``, ``T = 9 -> 4/4/1``, ``T = 2 -> 1/1/0``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from qcnn.methods import procedure_params, quantize_and_calibrate, register_procedure, train_quantized
from qcnn.methods.base import LayerContext, Method, register_method
from qcnn.models import MODELS, build_model
from qcnn.models.bireal import CIFAR_DEPTHS, BiRealCifarResNet, BiRealResNet18, LeNet5BiReal
from qcnn.models.lenet import LeNet5
from qcnn.models.resnet_cifar import CifarResNet
from qcnn.quant.base import Quantizer
from qcnn.quant.binary import ApproxSignQuantizer, MagnitudeAwareBinaryWeight
from qcnn.recipes import Recipe
from qcnn.train import evaluate, fit


@dataclass
class BiRealOptions:
    #: also binarize the 1x1 downsample convolutions (Bi-Real keeps them real-valued)
    binarize_1x1: bool = False


@register_method
class BiRealMethod(Method):
    """Bi-Real Net: ApproxSign binary activations and magnitude-aware binary weights on every hidden conv /
    linear layer; 1x1 downsample convs stay real (option ``binarize_1x1``), residual adds stay real. First
    and last layers follow the recipe's ``first_last`` policy (Bi-Real keeps them real: ``fp32``)."""

    requires_quantized_activations = True
    name = "bireal"
    Options = BiRealOptions
    weight_bits = (1,)
    act_bits = (1,)

    def _real_1x1(self, ctx: LayerContext) -> bool:
        m = ctx.module
        return isinstance(m, nn.Conv2d) and tuple(m.kernel_size) == (1, 1) and not self.options.binarize_1x1

    def weight_quantizer(self, ctx: LayerContext) -> Quantizer | None:
        if self._real_1x1(ctx):
            return None
        if ctx.w_bits == 1:
            return MagnitudeAwareBinaryWeight()
        return super().weight_quantizer(ctx)

    def act_quantizer(self, ctx: LayerContext) -> Quantizer | None:
        if self._real_1x1(ctx):
            return None
        if ctx.a_bits == 1:
            return ApproxSignQuantizer()
        return super().act_quantizer(ctx)

    def add_quantizer(self, a_bits: int, calib: str) -> Quantizer | None:
        return None


_PARAMS = {"pretrain_epochs", "binary_epochs", "bn_epochs", "bn_lr"}


def transfer_weights(dst: nn.Module, src: nn.Module) -> tuple[list[str], list[str]]:
    """Copy every parameter/buffer of ``src`` whose name and shape match one of ``dst``.

    Returns (copied names, names of ``dst`` left at their initial value).
    """
    src_sd = src.state_dict()
    dst_sd = dst.state_dict()
    copied, kept = [], []
    for k, v in dst_sd.items():
        if k in src_sd and src_sd[k].shape == v.shape:
            dst_sd[k] = src_sd[k].detach().clone().to(v.dtype)
            copied.append(k)
        else:
            kept.append(k)
    dst.load_state_dict(dst_sd)
    return copied, kept


def _is_tv_resnet18(model: nn.Module) -> bool:
    """Whether ``model`` is a torchvision ResNet-18 (BasicBlocks, two per stage)."""
    try:
        from torchvision.models.resnet import BasicBlock, ResNet
    except ImportError:  # pragma: no cover - torchvision is a dependency
        return False
    layers = [getattr(model, f"layer{i}", None) for i in range(1, 5)]
    return isinstance(model, ResNet) and all(
        layer is not None and len(layer) == 2 and isinstance(layer[0], BasicBlock) for layer in layers)


def bireal_network(model: nn.Module, bundle=None) -> tuple[nn.Module, list[str], list[str]]:
    """(Bi-Real network, transferred names, initialised names) for ``model`` (see module docstring).

    A network built here comes from its zoo factory and carries its ``arch`` record
    (:func:`qcnn.models.arch_record`).
    """

    if isinstance(model, (BiRealCifarResNet, BiRealResNet18, LeNet5BiReal)):
        return model, [], []
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    kw = dict(num_classes=last.out_features, in_channels=conv.in_channels)
    if isinstance(model, LeNet5):
        if bundle is not None and getattr(bundle, "image_size", None) is not None:
            kw["image_size"] = bundle.image_size
        net = build_model("lenet5_bireal", width=conv.out_channels / 6, **kw)
    elif isinstance(model, CifarResNet):
        depth = 6 * sum(1 for _ in model.layer1) + 2
        name = f"bireal_resnet{depth}"
        if name not in MODELS:
            raise ValueError(f"no Bi-Real variant of a depth-{depth} CIFAR ResNet; the zoo has "
                             f"{', '.join(f'bireal_resnet{d}' for d in CIFAR_DEPTHS)}")
        net = build_model(name, width=conv.out_channels / 16, **kw)
    elif _is_tv_resnet18(model):
        net = build_model("bireal_resnet18", width=conv.out_channels / 64, **kw)
    else:
        raise ValueError(
            f"no Bi-Real variant of {type(model).__name__}; use lenet5, resnet20/32/44/56, tv:resnet18 or a "
            "bireal_* zoo model"
        )
    net = net.to(next(model.parameters()).device)
    copied, kept = transfer_weights(net, model)
    return net, copied, kept


def split_epochs(total: int, params: dict) -> tuple[int, int, int]:
    """(pretrain, binary, bn) epochs: ``procedure_params`` where given, the rest of ``total`` shared as in the
    module docstring (``bn = 1 if total >= 3 else 0``, ``pretrain = (total - bn) // 2``, binary the rest)."""
    keys = ("pretrain_epochs", "binary_epochs", "bn_epochs")
    given = {k: int(params[k]) for k in keys if k in params}
    for k, v in given.items():
        if v < 0:
            raise ValueError(f"{k}={v} must be >= 0")
    total = int(total)
    bn = given.get("bn_epochs", 1 if total >= 3 else 0)
    pre = given.get("pretrain_epochs", max(0, total - bn) // 2)
    binary = given.get("binary_epochs", max(0, total - pre - bn))
    return pre, binary, bn


def _bn_params(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            for p in (m.weight, m.bias) if p is not None]


@register_procedure("bireal")
def bireal(model: nn.Module, bundle, recipe: Recipe, out_dir: str | Path | None = None,
           resume: bool = False) -> tuple[nn.Module, dict]:
    """Bi-Real two-step training (module docstring); returns (binary model, metrics)."""

    params = procedure_params(recipe, _PARAMS, "bireal")
    pre_ep, bin_ep, bn_ep = split_epochs(recipe.train.epochs, params)
    out = Path(out_dir) if out_dir is not None else None
    sub = (lambda name: out / name) if out is not None else (lambda name: None)

    net, copied, kept = bireal_network(model, bundle)
    metrics: dict = {"transferred": len(copied), "initialised": kept,
                     "stage_epochs": {"pretrain": pre_ep, "binary": bin_ep, "bn": bn_ep}}
    if pre_ep > 0:
        r = fit(net, bundle, dataclasses.replace(recipe.train, epochs=pre_ep), sub("pretrain"), resume=resume)
        metrics["pretrain_top1"] = r["top1"]
    else:
        metrics["pretrain_top1"] = evaluate(net, bundle.test)["top1"]

    qmodel = quantize_and_calibrate(net, recipe, bundle)
    metrics["binarized_top1"] = evaluate(qmodel, bundle.test)["top1"]
    if bin_ep > 0:
        r = train_quantized(qmodel, bundle, recipe.replace(train={"epochs": bin_ep}), sub("binary"), resume)
        metrics["binary_top1"] = r["top1"]

    if bn_ep > 0:
        bn = _bn_params(qmodel)
        ids = {id(p) for p in bn}
        frozen = [p for p in qmodel.parameters() if id(p) not in ids and p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)
        spec = dataclasses.replace(recipe.train, epochs=bn_ep, lr=float(params.get("bn_lr", recipe.train.lr)))
        try:
            r = fit(qmodel, bundle, spec, sub("bn"), param_groups=lambda m: [{"params": bn, "weight_decay": 0.0}],
                    resume=resume)
        finally:
            for p in frozen:
                p.requires_grad_(True)
        metrics["bn_top1"] = r["top1"]
    final = evaluate(qmodel, bundle.test)
    metrics.update(top1=final["top1"], loss=final["loss"])
    return qmodel, metrics


__all__ = ["bireal", "bireal_network", "split_epochs", "transfer_weights"]
