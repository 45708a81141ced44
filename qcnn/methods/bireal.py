"""Bi-Real Net two-step training (Liu et al., ECCV 2018; quantizers in :mod:`qcnn.quant.binary`).

1. **Network.** A Bi-Real model from the zoo (``bireal_resnet20``, ``bireal_resnet18``, ``lenet5_bireal``) is
   used as is. A real-valued zoo model is mapped to its Bi-Real variant of the same width and classes and
   its weights are *transferred by name*: every parameter and buffer whose qualified name and shape are
   the same in both networks is copied (``resnet20`` -> ``bireal_resnet20``: stem, all 3x3 convs and their
   BNs, classifier; the new 1x1 downsample convs keep their init; ``lenet5`` -> ``lenet5_bireal``: every
   conv/linear and BN1/BN2, the new BN3/BN4 start at identity). The copied and the freshly initialised
   names are returned in the metrics (``transferred``, ``initialised``).
2. **Real-valued pretraining** with ``clip(-1, x, 1)`` activations (the Bi-Real networks' ``Hardtanh``)
   for ``pretrain_epochs`` epochs (cross-entropy, ``recipe.train`` optimizer settings).
3. **Binarization**: ``quantize(net, recipe)`` (sign/ApproxSign activations, magnitude-aware binary
   weights), calibration of any non-binary first/last layer, then ``binary_epochs`` epochs of training.
4. **BN-only retraining** (the official recipe's last stage): every parameter except BatchNorm weight/bias
   is frozen and ``bn_epochs`` epochs re-fit BN (statistics and affine) to the binary network.

``procedure_params``: ``pretrain_epochs``, ``binary_epochs``, ``bn_epochs`` (default: ``recipe.train.epochs``
split as evenly as possible, remainder to the binary step), ``bn_lr`` (default ``recipe.train.lr``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from torch import nn

from qcnn.methods import quantize_and_calibrate, register_procedure, train_quantized
from qcnn.methods.wage import _check_params, arch_of
from qcnn.recipes import Recipe

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


def bireal_network(model: nn.Module, bundle=None) -> tuple[nn.Module, list[str], list[str]]:
    """(Bi-Real network, transferred names, initialised names) for ``model`` (see module docstring)."""
    import qcnn.models.bireal  # noqa: F401  (registers the bireal_* models)
    from qcnn.models import build_model
    from qcnn.models.bireal import BiRealCifarResNet, BiRealResNet18, LeNet5BiReal
    from qcnn.models.lenet import LeNet5
    from qcnn.models.resnet_cifar import CifarResNet

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
        blocks = sum(1 for _ in model.layer1)
        net = BiRealCifarResNet(6 * blocks + 2, width=conv.out_channels / 16, **kw)
    elif type(model).__name__ == "ResNet" and hasattr(model, "layer4") and len(model.layer1) == 2:
        net = build_model("bireal_resnet18", width=conv.out_channels / 64, **kw)  # torchvision resnet18
    else:
        raise ValueError(
            f"no Bi-Real variant of {type(model).__name__}; use lenet5, resnet20/32/44/56, tv:resnet18 or a "
            "bireal_* zoo model"
        )
    net = net.to(next(model.parameters()).device)
    copied, kept = transfer_weights(net, model)
    return net, copied, kept


def split_epochs(total: int, params: dict) -> tuple[int, int, int]:
    """(pretrain, binary, bn) epochs from ``procedure_params`` or an even split of ``total``."""
    keys = ("pretrain_epochs", "binary_epochs", "bn_epochs")
    if all(k in params for k in keys):
        out = tuple(int(params[k]) for k in keys)
    else:
        base, rem = divmod(int(total), 3)
        default = {"pretrain_epochs": base, "binary_epochs": base + rem, "bn_epochs": base}
        out = tuple(int(params.get(k, default[k])) for k in keys)
    for k, v in zip(keys, out):
        if v < 0:
            raise ValueError(f"{k}={v} must be >= 0")
    return out  # type: ignore[return-value]


def _bn_params(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            for p in (m.weight, m.bias) if p is not None]


@register_procedure("bireal")
def bireal(model: nn.Module, bundle, recipe: Recipe, out_dir: str | Path | None = None,
           resume: bool = False) -> tuple[nn.Module, dict]:
    """Bi-Real two-step training (module docstring); returns (binary model, metrics)."""
    from qcnn.train import evaluate, fit

    params = dict(recipe.procedure_params)
    _check_params(params, _PARAMS, "bireal")
    pre_ep, bin_ep, bn_ep = split_epochs(recipe.train.epochs, params)
    out = Path(out_dir) if out_dir is not None else None
    sub = (lambda name: out / name) if out is not None else (lambda name: None)

    net, copied, kept = bireal_network(model, bundle)
    arch = None
    if net is not model:
        from qcnn.models.bireal import BiRealCifarResNet, LeNet5BiReal

        conv = next(m for m in net.modules() if isinstance(m, nn.Conv2d))
        if isinstance(net, LeNet5BiReal):
            arch = arch_of(net, "lenet5_bireal", conv.out_channels / 6, bundle)
        elif isinstance(net, BiRealCifarResNet) and len(net.layer1) == 3:
            arch = arch_of(net, "bireal_resnet20", conv.out_channels / 16)
        elif not isinstance(net, BiRealCifarResNet):
            arch = arch_of(net, "bireal_resnet18", conv.out_channels / 64)
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
    if arch is not None:
        metrics["arch"] = arch  # the network trained is not the one passed in
    return qmodel, metrics


__all__ = ["bireal", "bireal_network", "split_epochs", "transfer_weights"]
