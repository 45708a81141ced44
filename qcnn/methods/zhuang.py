"""Training procedures of Zhuang et al., "Towards Effective Low-bitwidth Convolutional Neural Networks"
(CVPR 2018, arXiv 1711.00205): two-step, progressive and guided training.

The quantizers are the recipe's method (the paper uses DoReFa's); these functions only decide what is
trained when. All three start from the float ``model`` and use the shared pieces
(:func:`~qcnn.methods.quantize_and_calibrate`, :func:`~qcnn.methods.train_quantized`,
:func:`qcnn.train.fit`).

``two_step`` (TS)
    Stage 1 trains with quantized weights and full-precision activations (every activation quantizer
    removed); stage 2 re-quantizes weights *and* activations, starting from stage 1's weights.
``progressive`` (PQ)
    A sequence of bit widths (``procedure_params.bits``, default ``[8, 4]``, each a W=A width or a
    ``[w, a]`` pair) followed by the recipe's own ``w_bits``/``a_bits``; each stage starts from the previous
    stage's weights.
``guided``
    A full-precision net and the low-bit net, both initialised from ``model``, are trained jointly; each
    net's loss is ``CE + lambda/2 sum_i || f_i/||f_i|| - g_i/||g_i|| ||^2`` over the outputs of the named
    modules ``procedure_params.layers`` (default: the last top-level child that holds a convolution, e.g.
    ``layer3`` of a CIFAR ResNet), ``f`` from the low-bit net, ``g`` from the full-precision one, each
    normalised per sample. Summing both losses gives one backward pass in which each net receives exactly
    the gradient of its own loss (the other net's cross-entropy does not depend on its parameters).
    ``procedure_params.lam`` is lambda (default 1.0). The outputs are read by forward hooks on identity
    "tap" modules placed after the named modules with torch.fx (taps are removed from the returned model).

Budget: the recipe's ``train.epochs`` is the total; ``procedure_params.split`` (default equal) divides its
optimizer steps between the stages. A stage shorter than an epoch runs on the first part of each epoch's
shuffled batches (later stages see later epochs' shuffles). With ``out_dir`` each stage trains in
``out_dir/stage<i>`` and ends with ``stage.pt`` (its model state); ``resume`` skips finished stages and
resumes the unfinished one. Quantizer parameters (PACT alpha, LSQ steps, ranges) are re-initialised by
calibration at every stage; weights and BatchNorm statistics carry over.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import fx, nn

from qcnn.io import load_torch, save_torch
from qcnn.methods import procedure_params, quantize_and_calibrate, register_procedure, train_quantized
from qcnn.methods.place import quantize
from qcnn.nn.layers import QAct, QAdd, QCat, QConv2d, QLinear, QMul
from qcnn.recipes import Recipe
from qcnn.train import evaluate

_TWO_STEP_KEYS = {"split"}
_PROGRESSIVE_KEYS = {"bits", "split"}
_GUIDED_KEYS = {"lam", "layers"}


# -- budget ----------------------------------------------------------------------------------------------
class _LimitedLoader:
    """At most ``n`` batches of ``loader`` per epoch; epoch ``e`` draws the loader's epoch ``e + offset``."""

    def __init__(self, loader, n: int, offset: int):
        self.loader, self.n, self.offset = loader, n, offset

    def __len__(self) -> int:
        return min(self.n, len(self.loader))

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.loader, "set_epoch"):
            self.loader.set_epoch(epoch + self.offset)

    def __iter__(self):
        for i, batch in enumerate(self.loader):
            if i >= self.n:
                break
            yield batch

    def __getattr__(self, name):
        if name == "loader":
            raise AttributeError(name)
        return getattr(self.loader, name)


def split_budget(recipe: Recipe, n_batches: int, fractions: list[float] | None, n_stages: int) -> list[tuple[int, int]]:
    """``(epochs, batches_per_epoch)`` of each stage, dividing ``recipe.train.epochs * n_batches`` steps."""
    fr = list(fractions) if fractions is not None else [1.0] * n_stages
    if len(fr) != n_stages or any(not f > 0 for f in fr):
        raise ValueError(f"split={fractions!r} must hold {n_stages} positive fractions")
    total = recipe.train.epochs * n_batches
    out = []
    for f in fr:
        steps = max(1, round(total * f / sum(fr)))
        epochs = max(1, math.ceil(steps / n_batches))
        out.append((epochs, math.ceil(steps / epochs)))
    return out


def _stage_bundle(bundle, batches: int, offset: int):
    b = copy.copy(bundle)
    b.train = _LimitedLoader(bundle.train, batches, offset)
    return b


# -- model plumbing --------------------------------------------------------------------------------------
def float_from(qmodel: nn.Module, float_model: nn.Module) -> nn.Module:
    """A copy of ``float_model`` holding ``qmodel``'s float weights and BN statistics (same key names)."""
    fm = copy.deepcopy(float_model)
    own = fm.state_dict()
    src = qmodel.state_dict()
    common = {k: v for k, v in src.items() if k in own and own[k].shape == v.shape}
    missing = sorted(k for k in own if k not in common and not k.endswith("num_batches_tracked"))
    if missing and len(missing) == len(own):
        raise ValueError("the quantized model shares no weights with the float model")
    fm.load_state_dict(common, strict=False)
    return fm


def drop_act_quantizers(qmodel: nn.Module) -> nn.Module:
    """Weights-only quantization: remove every activation (and residual-add) quantizer."""
    for m in qmodel.modules():
        if isinstance(m, (QConv2d, QLinear)):
            m.input_quant = None
        elif isinstance(m, (QAdd, QCat, QMul, QAct)):
            m.out_quant = None
            if isinstance(m, QAct):
                m.input_quant = None
    return qmodel


def _run_stage(i: int, model: nn.Module, bundle, recipe: Recipe, budget: tuple[int, int], out_dir, resume: bool,
               weights_only: bool = False, **fit_kwargs) -> tuple[nn.Module, dict]:
    epochs, per_epoch = budget
    stage_recipe = recipe.replace(train={"epochs": epochs})
    sdir = Path(out_dir) / f"stage{i}" if out_dir is not None else None
    done = sdir / "stage.pt" if sdir is not None else None
    if resume and done is not None and done.is_file():
        state = load_torch(done)
        qmodel = quantize(model, stage_recipe).to(next(model.parameters()).device)
        if weights_only:
            drop_act_quantizers(qmodel)
        qmodel.load_state_dict(state["model"])
        return qmodel, state["metrics"]
    qmodel = quantize_and_calibrate(model, stage_recipe, bundle)
    if weights_only:
        drop_act_quantizers(qmodel)
    metrics = train_quantized(qmodel, _stage_bundle(bundle, per_epoch, 1000 * i), stage_recipe, sdir, resume,
                              **fit_kwargs)
    metrics = {k: v for k, v in metrics.items() if k != "history"} | {
        "stage": i, "w_bits": stage_recipe.w_bits, "a_bits": None if weights_only else stage_recipe.a_bits,
        "epochs": epochs, "batches_per_epoch": min(per_epoch, len(bundle.train))}
    if done is not None:
        save_torch({"model": qmodel.state_dict(), "metrics": metrics}, done)
    return qmodel, metrics


def _summary(qmodel: nn.Module, stages: list[dict]) -> dict:
    last = stages[-1]
    return {"top1": last["top1"], "loss": last["loss"], "seconds": round(sum(s["seconds"] for s in stages), 3),
            "stages": stages}


# -- procedures ------------------------------------------------------------------------------------------
@register_procedure("two_step")
def two_step(model: nn.Module, bundle, recipe: Recipe, out_dir=None, resume: bool = False):
    """TS: weights-only quantized training, then weights + activations from that initialisation."""
    p = procedure_params(recipe, _TWO_STEP_KEYS, "two_step")
    budgets = split_budget(recipe, len(bundle.train), p.get("split"), 2)
    q1, m1 = _run_stage(0, model, bundle, recipe, budgets[0], out_dir, resume, weights_only=True)
    q2, m2 = _run_stage(1, float_from(q1, model), bundle, recipe, budgets[1], out_dir, resume)
    return q2, _summary(q2, [m1, m2])


def progressive_bits(recipe: Recipe, bits) -> list[tuple[int, int]]:
    """The stage bit widths ``[(w, a), ...]`` ending with the recipe's own."""
    stages = []
    for b in (bits if bits is not None else [8, 4]):
        w, a = (b, b) if isinstance(b, int) else tuple(b)
        # float activations (a_bits None): every stage quantizes the weights only
        stages.append((int(w), None if recipe.a_bits is None else int(a)))
    final = (recipe.w_bits, recipe.a_bits)
    stages = [s for s in stages if s != final] + [final]
    return stages


@register_procedure("progressive")
def progressive(model: nn.Module, bundle, recipe: Recipe, out_dir=None, resume: bool = False):
    """PQ: train at each bit width of the schedule in turn, each stage from the previous one's weights."""
    p = procedure_params(recipe, _PROGRESSIVE_KEYS, "progressive")
    stages = progressive_bits(recipe, p.get("bits"))
    budgets = split_budget(recipe, len(bundle.train), p.get("split"), len(stages))
    current, metrics, qmodel = model, [], None
    for i, ((w, a), budget) in enumerate(zip(stages, budgets)):
        qmodel, m = _run_stage(i, current, bundle, dataclasses.replace(recipe, w_bits=w, a_bits=a), budget, out_dir,
                               resume)
        metrics.append(m)
        current = float_from(qmodel, model)
    return qmodel, _summary(qmodel, metrics)


# -- guided ----------------------------------------------------------------------------------------------
TAP_PREFIX = "guide_tap_"


def default_guide_layers(model: nn.Module) -> list[str]:
    """The last top-level child module that contains a convolution."""
    last = None
    for name, child in model.named_children():
        if any(isinstance(m, nn.Conv2d) for m in child.modules()):
            last = name
    if last is None:
        raise ValueError(f"guided: {type(model).__name__} has no child module with a convolution; "
                         "set procedure_params.layers")
    return [last]


def add_taps(model: nn.Module, names: list[str]) -> nn.Module:
    """A torch.fx copy of ``model`` with an ``nn.Identity`` tap after the output of each named module."""
    gm = fx.symbolic_trace(model)
    for j, name in enumerate(names):
        last = None
        for node in gm.graph.nodes:
            stack = node.meta.get("nn_module_stack") or {}
            if any((v[0] if isinstance(v, tuple) else k) == name for k, v in stack.items()):
                last = node
        if last is None:
            raise ValueError(f"guided: module {name!r} not found in {type(model).__name__}; top-level modules: "
                             f"{[n for n, _ in model.named_children()]}")
        tap = f"{TAP_PREFIX}{j}"
        gm.add_submodule(tap, nn.Identity())
        with gm.graph.inserting_after(last):
            new = gm.graph.call_module(tap, (last,))
        last.replace_all_uses_with(new, delete_user_cb=lambda u, new=new: u is not new)
    gm.recompile()
    return gm


def remove_taps(gm: nn.Module) -> nn.Module:
    """Undo :func:`add_taps` on a (quantized) GraphModule."""
    if not isinstance(gm, fx.GraphModule):
        return gm
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and str(node.target).startswith(TAP_PREFIX):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            delattr(gm, node.target)
    gm.recompile()
    return gm


class GuidedPair(nn.Module):
    """The low-bit net and its full-precision guide; ``forward`` is the low-bit net's."""

    def __init__(self, low: nn.Module, full: nn.Module, taps: list[str]):
        super().__init__()
        self.low, self.full = low, full
        self.feats: dict[str, list] = {"low": [None] * len(taps), "full": [None] * len(taps)}
        for side, net in (("low", low), ("full", full)):
            mods = dict(net.named_modules())
            for j, t in enumerate(taps):
                mods[t].register_forward_hook(self._hook(side, j))

    def _hook(self, side: str, j: int):
        def hook(_m, _inp, out):
            self.feats[side][j] = out
        return hook

    def forward(self, x):
        return self.low(x)


def guidance_distance(f: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Batch mean of ``|| f/||f|| - g/||g|| ||^2`` with per-sample L2 normalisation."""
    f = F.normalize(f.flatten(1).float(), dim=1)
    g = F.normalize(g.flatten(1).float(), dim=1)
    return (f - g).pow(2).sum(dim=1).mean()


def guided_loss(lam: float):
    def loss_fn(net, x, y):
        pair = getattr(net, "module", net)
        logits_low = pair.low(x)
        logits_full = pair.full(x)
        dist = sum(guidance_distance(f, g) for f, g in zip(pair.feats["low"], pair.feats["full"]))
        loss = F.cross_entropy(logits_low.float(), y) + F.cross_entropy(logits_full.float(), y) + lam / 2 * dist
        return loss, logits_low
    return loss_fn


@register_procedure("guided")
def guided(model: nn.Module, bundle, recipe: Recipe, out_dir=None, resume: bool = False):
    """Guided training: full-precision and low-bit nets trained jointly with a feature-guidance loss."""

    p = procedure_params(recipe, _GUIDED_KEYS, "guided")
    lam = float(p.get("lam", 1.0))
    names = list(p.get("layers") or default_guide_layers(model))
    try:
        tapped = add_taps(model, names)
        taps = [f"{TAP_PREFIX}{j}" for j in range(len(names))]
    except (fx.proxy.TraceError, TypeError, NotImplementedError) as e:
        warnings.warn(f"guided: torch.fx could not trace the model ({e}); hooking the named modules directly",
                      stacklevel=2)
        tapped, taps = model, names
    full = copy.deepcopy(tapped)
    low = quantize_and_calibrate(tapped, recipe, bundle)
    pair = GuidedPair(low, full, taps)
    metrics = train_quantized(pair, bundle, recipe, out_dir, resume, loss_fn=guided_loss(lam))
    metrics["full_precision_top1"] = evaluate(full, bundle.test)["top1"]
    metrics["lam"], metrics["layers"] = lam, names
    return remove_taps(low), metrics


__all__ = ["GuidedPair", "add_taps", "default_guide_layers", "drop_act_quantizers", "float_from",
           "guidance_distance", "guided", "progressive", "progressive_bits", "remove_taps", "split_budget",
           "two_step"]
