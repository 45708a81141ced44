"""One training and evaluation loop for every model and method (float training, QAT, procedures).

:func:`fit` trains ``spec.epochs`` epochs of a :class:`~qcnn.recipes.TrainSpec` on a
:class:`~qcnn.data.DataBundle`:

* optimizer: ``sgd`` (momentum, Nesterov) or ``adam`` / ``adamw``; a ``make_optimizer(groups, spec)``
  callback supplies custom ones (WAGE's). Weight decay applies to weights with two or more dimensions
  (conv / linear kernels) only; BatchNorm parameters, biases and scalar quantizer parameters (PACT alpha,
  LSQ steps) are not decayed unless a ``param_groups(model)`` callback says otherwise.
* schedule, stepped after every optimizer step (torch's schedulers): ``constant``; ``step`` (multiply by
  ``gamma`` every ``step_size`` epochs); ``cosine`` (to 0 over the run); ``onecycle`` (warm-up over the
  first 30% to ``lr`` then cosine annealing, with momentum cycled inversely).
* mixed precision (``spec.amp``) on CUDA: float16 autocast and a gradient scaler; ignored on CPU.
* progress on stderr (:func:`progress_mode`): a tqdm bar and one line per epoch on an interactive terminal;
  outside one (a log file, a pipe) one plain line per epoch (epoch, train / test loss and top-1, seconds), so
  that a log shows the run as it goes; nothing with ``QCNN_PROGRESS=0``.
* speed: ``spec.kernels="fused"`` runs every quantizer as compiled fused kernels (:mod:`qcnn.quant.kernels`);
  ``spec.compile`` trains and evaluates ``torch.compile(model)`` (the quantizers trace without graph breaks,
  so inductor fuses each with its neighbours). Both compile on first use (seconds to a minute on a CPU).
* BatchNorm freeze (``spec.freeze_bn`` epochs, fractions allowed; 0 = from the first step): from that step on
  every BatchNorm normalises with its running statistics and stops updating them (torch.ao QAT's
  ``freeze_bn_stats``), which keeps QAT of depthwise / squeeze-excitation nets on fixed statistics.
* gradients: ``spec.grad_clip`` clips the global norm before every step; the norm is also watched (first 10
  steps, then every 10th) and a norm over 1000x the first step's, or a non-finite one, gives one warning that
  names the parameter with the largest gradient and the remedies.
* a non-finite training loss stops the run with ``FloatingPointError`` before that epoch is evaluated or
  saved: ``last.pt`` and ``metrics.jsonl`` keep the last finite epoch.
* with ``out_dir``: one JSON line per epoch in ``out_dir/metrics.jsonl`` and an atomic checkpoint
  ``out_dir/last.pt`` after every epoch holding model, optimizer, scheduler, scaler, RNG states, epoch and
  history. ``resume=True`` restores it and continues the run exactly: since the data order and augmentation
  of epoch ``e`` depend only on ``(seed, e)``, two epochs straight and one epoch + resume + one epoch give
  identical weights.
* distributed: launched with ``torchrun`` (``WORLD_SIZE`` > 1 in the environment), :func:`init_distributed`
  joins the process group (nccl on CUDA, gloo on CPU), the model is wrapped in
  ``DistributedDataParallel``, the training data must be sharded (``get_data(..., rank=, world_size=)``)
  and only rank 0 writes files. Evaluation loaders are not sharded: every rank evaluates the whole test set
  with the same weights.

Tasks: a classifier trains on cross-entropy and reports top-1; a detector of the zoo (``yolo_tiny``,
:func:`qcnn.detection.task.task_of`) brings its own loss and metric: its batches are ``(x, targets)`` with
targets a list of ``{"boxes", "labels"}`` dicts, and every epoch records ``test_map_50`` / ``test_map`` /
``test_map_75`` (COCO mAP in points, :mod:`qcnn.detection.yolo`) in place of top-1.

Callbacks: ``loss_fn(model, x, y) -> (loss, logits)`` (default: the task's loss, else cross-entropy),
``param_groups(model) -> list[dict]``, ``make_optimizer(groups, spec)``, ``step_hook(model, step)`` after every
optimizer step,
``epoch_hook(model, epoch, metrics)`` after every epoch (``epoch`` counts from 0; ``metrics`` may be
extended by the hook before it is written). Hooks get the unwrapped module; ``loss_fn`` gets the module that
runs the forward (the DDP wrapper when distributed; its ``.module`` is the model).
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from qcnn.calib.batchnorm import batchnorms
from qcnn.detection.task import task_of
from qcnn.io import load_torch, save_torch, write_text
from qcnn.models.weights import load_state_dict_checked
from qcnn.quant import kernels
from qcnn.recipes import TrainSpec

TRAIN_FORMAT = "qcnn-train/1"
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "step", "cosine", "onecycle")
DIVERGENCE_RATIO = 1e3  #: a gradient norm this many times the first step's is reported as divergence


# -- distributed -----------------------------------------------------------------------------------------
def dist_info() -> tuple[int, int]:
    """(rank, world_size) of this process; (0, 1) when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def init_distributed(device: str | torch.device | None = None) -> tuple[int, int]:
    """Join the process group when launched by ``torchrun`` (``WORLD_SIZE`` > 1); returns (rank, world_size).

    The backend is nccl for CUDA devices and gloo otherwise. On CUDA each process uses GPU ``LOCAL_RANK``.
    Idempotent; without ``WORLD_SIZE`` > 1 it does nothing and returns (0, 1).
    """
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        cuda = device is not None and torch.device(device).type == "cuda"
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size()


def distributed_device(device: str | torch.device) -> torch.device:
    """``device`` with the local GPU index under torchrun (``cuda`` -> ``cuda:LOCAL_RANK``)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return device


def is_main_process() -> bool:
    return dist_info()[0] == 0


# -- evaluation ------------------------------------------------------------------------------------------
def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    if p is None:
        p = next(model.buffers(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, max_batches: int | None = None) -> dict:
    """Top-1 accuracy (percent) and mean cross-entropy of ``model`` on ``loader``, in eval mode.

    The model's train/eval mode is restored afterwards. A loader sharded over ranks (``world_size`` > 1)
    is summed over the process group. A detector of the zoo (:func:`qcnn.detection.task.task_of`) is
    evaluated by its task instead: COCO mAP in percent points (``map_50``, ``map``, ``map_75``), ``loss`` and
    ``"metric": "map_50"`` (the headline figure; classifiers have none: top-1).
    """
    task = task_of(model)
    if task is not None:
        return task.evaluate(model, loader, max_batches)
    was_training = model.training
    model.eval()
    device = _device_of(model)
    correct = torch.zeros((), dtype=torch.float64, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    try:
        for i, (x, y) in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            if not isinstance(y, torch.Tensor):
                raise ValueError(f"evaluate: the loader's targets are {type(y).__name__}, not class labels, and "
                                 f"{type(model).__name__} is no zoo detector (detectors: "
                                 "qcnn.detection.task.DETECTORS; build them with qcnn.models.build_model)")
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            logits = model(x).float()
            loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
            correct += (logits.argmax(1) == y).sum().double()
            count += y.numel()
    finally:
        model.train(was_training)
    if getattr(loader, "world_size", 1) > 1 and dist.is_initialized():
        stats = torch.stack([correct, loss_sum, count])
        dist.all_reduce(stats)
        correct, loss_sum, count = stats
    n = count.item()
    if n == 0:
        raise ValueError("evaluate: the loader is empty (0 images)")
    return {"top1": 100.0 * correct.item() / n, "loss": loss_sum.item() / n}


# -- optimizer and schedule ------------------------------------------------------------------------------
def default_param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay kernels (ndim >= 2); BN parameters, biases and scalar quantizer parameters are not decayed."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def make_default_optimizer(groups: list[dict], spec: TrainSpec) -> torch.optim.Optimizer:
    opt = spec.optimizer.lower()
    if opt == "sgd":
        return torch.optim.SGD(groups, lr=spec.lr, momentum=spec.momentum,
                               nesterov=bool(spec.nesterov and spec.momentum > 0), weight_decay=spec.weight_decay)
    if opt == "adam":
        return torch.optim.Adam(groups, lr=spec.lr, weight_decay=spec.weight_decay)
    if opt == "adamw":
        return torch.optim.AdamW(groups, lr=spec.lr, weight_decay=spec.weight_decay)
    raise ValueError(f"unknown optimizer {spec.optimizer!r}; choose one of {OPTIMIZERS}")


def make_scheduler(opt: torch.optim.Optimizer, spec: TrainSpec, steps_per_epoch: int):
    """Per-step scheduler for ``spec.schedule`` (None for ``constant``)."""
    total = max(1, spec.epochs * steps_per_epoch)
    sched = spec.schedule.lower()
    if sched == "constant":
        return None
    if sched == "step":
        if spec.step_size < 1:
            raise ValueError(f"step_size={spec.step_size} must be >= 1 epoch")
        return torch.optim.lr_scheduler.StepLR(opt, step_size=spec.step_size * steps_per_epoch, gamma=spec.gamma)
    if sched == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    if sched == "onecycle":
        cycle = any(k in opt.defaults for k in ("momentum", "betas")) and (
            opt.defaults.get("momentum", 1.0) > 0)
        return torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=[g["lr"] for g in opt.param_groups], total_steps=total, cycle_momentum=cycle)
    raise ValueError(f"unknown schedule {spec.schedule!r}; choose one of {SCHEDULES}")


def check_spec(spec: TrainSpec) -> None:
    if spec.epochs < 0:
        raise ValueError(f"epochs={spec.epochs} must be >= 0")
    if not (spec.lr > 0 and math.isfinite(spec.lr)):
        raise ValueError(f"lr={spec.lr} must be a positive number")
    if not spec.weight_decay >= 0:  # NaN too
        raise ValueError(f"weight_decay={spec.weight_decay} must be >= 0")
    if not spec.momentum >= 0:
        raise ValueError(f"momentum={spec.momentum} must be >= 0")
    if not (spec.gamma > 0 and math.isfinite(spec.gamma)):
        raise ValueError(f"gamma={spec.gamma} must be a positive number (the step schedule's decay factor)")
    if spec.optimizer.lower() not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {spec.optimizer!r}; choose one of {OPTIMIZERS}")
    if spec.schedule.lower() not in SCHEDULES:
        raise ValueError(f"unknown schedule {spec.schedule!r}; choose one of {SCHEDULES}")


# -- RNG state -------------------------------------------------------------------------------------------
def _rng_state() -> dict:
    """Torch / CUDA / Python / NumPy generator states as tensors and numbers (loadable with weights_only)."""
    np_state = np.random.get_state()
    py = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "python": {"version": py[0], "state": torch.tensor(py[1], dtype=torch.int64),
                   "gauss": py[2] if py[2] is not None else float("nan")},
        "numpy": [torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    gauss = None if math.isnan(py["gauss"]) else py["gauss"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), gauss))
    keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def average_buffers(model: nn.Module) -> None:
    """Average floating-point buffers (BN running statistics, observer ranges) over the process group.

    DDP keeps parameters identical on every rank but each rank updates its buffers from its own shard;
    averaging them at the end of an epoch leaves all ranks with the same model.
    """
    world = dist.get_world_size()
    for b in model.buffers():
        if b.is_floating_point() and b.numel() > 0:
            dist.all_reduce(b)
            b.div_(world)


def _plain(obj):
    """``obj`` without callables (some torch schedulers keep bound methods in their state_dict)."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items() if not callable(v) or isinstance(v, torch.Tensor)}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain(v) for v in obj)
    return obj


# -- the loop --------------------------------------------------------------------------------------------
def cross_entropy_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logits = model(x)
    return F.cross_entropy(logits.float(), y), logits


def progress_mode() -> str:
    """How a run shows its progress on stderr: ``"bar"`` (tqdm, and one line per epoch) when stderr is an
    interactive terminal; ``"lines"`` (one plain, flushed line per epoch and per finished step such as
    calibration) when it is not (a log file, a pipe, a CI job, a notebook); ``"off"`` with ``QCNN_PROGRESS=0``
    and on every rank but 0."""
    if os.environ.get("QCNN_PROGRESS", "").strip().lower() in ("0", "false", "no", "off") or not is_main_process():
        return "off"
    return "bar" if sys.stderr.isatty() else "lines"


def progress_enabled() -> bool:
    """Whether a progress bar is shown (:func:`progress_mode` is ``"bar"``)."""
    return progress_mode() == "bar"


def progress_line(text: str) -> None:
    """``text`` as one line of progress on stderr, flushed at once (nothing when progress is off)."""
    if progress_mode() != "off":
        print(text, file=sys.stderr, flush=True)


def _write_metrics(path: Path, history: list[dict]) -> None:
    write_text(path, "".join(json.dumps(h) + "\n" for h in history))


def _check_finite_loss(loss: float, epoch: int, spec: TrainSpec, ckpt_path: Path | None) -> None:
    """Stop a diverged run before its epoch is evaluated or saved (``last.pt`` keeps the last finite one)."""
    if math.isfinite(loss):
        return
    kept = ckpt_path is not None and epoch > 0
    where = f"; {ckpt_path} keeps the last finite epoch ({epoch})" if kept else ""
    raise FloatingPointError(f"training diverged in epoch {epoch + 1}: the training loss is {loss} (lower the "
                             f"learning rate, now {spec.lr:g}){where}")


class _Run:
    """The state of one :func:`fit` call: model, optimiser, scheduler, scaler, counters and the output files."""

    def __init__(self, model: nn.Module, bundle, spec: TrainSpec, out_dir, loss_fn, param_groups, make_optimizer):
        self.model, self.spec = model, spec
        self.device = _device_of(model)
        self.rank, self.world = init_distributed(self.device)
        self.main = self.rank == 0
        self.train_loader, self.test_loader = bundle.train, bundle.test
        if self.world > 1 and getattr(self.train_loader, "world_size", 1) != self.world:
            raise ValueError(f"distributed training with world_size={self.world} needs training data sharded over "
                             f"the ranks: get_data(..., rank={self.rank}, world_size={self.world})")
        self.steps_per_epoch = len(self.train_loader)
        if self.steps_per_epoch == 0 and spec.epochs > 0:
            raise ValueError("the training set is empty: 0 batches per epoch")
        self.out = Path(out_dir) if out_dir is not None else None
        if self.out is not None and self.main:
            self.out.mkdir(parents=True, exist_ok=True)
        self.task = task_of(model)  #: a detector's task (loss and metric), None for a classifier
        self.loss_fn = loss_fn or (self.task.loss if self.task is not None else cross_entropy_loss)
        groups = param_groups(model) if param_groups is not None else default_param_groups(model, spec.weight_decay)
        self.optimizer = (make_optimizer or make_default_optimizer)(groups, spec)
        self.scheduler = make_scheduler(self.optimizer, spec, self.steps_per_epoch)
        self.use_amp = bool(spec.amp and self.device.type == "cuda")
        if spec.amp and not self.use_amp:
            warnings.warn("amp=True is ignored on a non-CUDA device", stacklevel=3)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        self.start_epoch, self.step, self.history = 0, 0, []
        self.ckpt_path = self.out / "last.pt" if self.out is not None else None
        self.metrics_path = self.out / "metrics.jsonl" if self.out is not None else None
        self.eval_model = model  #: what the per-epoch evaluation runs (the compiled model with spec.compile)
        self.bns = batchnorms(model)
        self.freeze_step = (None if spec.freeze_bn is None or not self.bns
                            else int(round(spec.freeze_bn * self.steps_per_epoch)))
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.first_norm, self.warned = None, False

    def resume(self) -> None:
        """Restore model, optimiser, scheduler, scaler, RNG and history from ``last.pt`` (exact resume)."""
        if self.ckpt_path is None:
            raise ValueError("resume=True needs out_dir (where last.pt is)")
        if not self.ckpt_path.is_file():
            warnings.warn(f"resume: {self.ckpt_path} does not exist, starting from scratch", stacklevel=3)
            return
        state = load_torch(self.ckpt_path, map_location=self.device)
        if not isinstance(state, dict) or state.get("format") != TRAIN_FORMAT:
            raise ValueError(f"{self.ckpt_path} is not a qcnn training checkpoint ({TRAIN_FORMAT})")
        spec = asdict(self.spec)
        if state["spec"] != spec:
            diff = sorted(k for k in spec if state["spec"].get(k) != spec[k])
            warnings.warn(f"resuming {self.ckpt_path} with a different training spec (changed: {diff})", stacklevel=3)
        load_state_dict_checked(self.model, state["model"], f"checkpoint {str(self.ckpt_path)!r}")
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"])
        self.start_epoch, self.step, self.history = int(state["epoch"]), int(state["step"]), list(state["history"])

    def wrapped(self) -> nn.Module:
        if self.world == 1:
            return self.model
        return DDP(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def train_epoch(self, net: nn.Module, epoch: int, step_hook, show: bool) -> tuple[float, float, float]:
        """One pass over the training set; returns (summed loss, correct, seen), reduced over the ranks."""
        spec, device = self.spec, self.device
        if hasattr(self.train_loader, "set_epoch"):
            self.train_loader.set_epoch(epoch)
        self.model.train()
        loss_sum, correct, seen = (torch.zeros((), dtype=torch.float64, device=device) for _ in range(3))
        bar = tqdm(total=self.steps_per_epoch, desc=f"epoch {epoch + 1}/{spec.epochs}", leave=False,
                   dynamic_ncols=True, file=sys.stderr) if show else None
        for i, (x, y) in enumerate(self.train_loader):
            x, y = x.to(device, non_blocking=True), _to_device(y, device)
            if self.freeze_step is not None and self.step >= self.freeze_step:
                for m in self.bns:  # after model.train() (every epoch) and from the freeze step on
                    m.eval()
            with torch.autocast(device.type, dtype=torch.float16, enabled=self.use_amp):
                loss, logits = self.loss_fn(net, x, y)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if spec.grad_clip is not None or self.step < 10 or self.step % 10 == 0:
                self.watch_gradients()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            if self.scheduler is not None:
                self.scheduler.step()
            self.step += 1
            if step_hook is not None:
                step_hook(self.model, self.step)
            with torch.no_grad():
                n = y.numel() if isinstance(y, torch.Tensor) else len(y)
                loss_sum += loss.detach().double() * n
                if self.task is None:
                    correct += (logits.detach().argmax(1) == y).sum().double()
                seen += n
            if bar is not None:
                bar.update(1)
                if i % 20 == 0:
                    bar.set_postfix(loss=f"{loss_sum.item() / max(1.0, seen.item()):.3f}")
        if bar is not None:
            bar.close()
        if self.world > 1:
            stats = torch.stack([loss_sum, correct, seen])
            dist.all_reduce(stats)
            loss_sum, correct, seen = stats
            average_buffers(self.model)
        return loss_sum.item(), correct.item(), seen.item()

    def watch_gradients(self) -> None:
        """Clip the global gradient norm (``spec.grad_clip``) and warn once when it explodes: non-finite, or more
        than ``DIVERGENCE_RATIO`` times the first step's norm (checked on the first 10 steps and every 10th)."""
        self.scaler.unscale_(self.optimizer)
        clip = self.spec.grad_clip if self.spec.grad_clip is not None else math.inf
        norm = float(torch.nn.utils.clip_grad_norm_(self.params, clip))
        if self.first_norm is None and math.isfinite(norm):
            self.first_norm = max(norm, 1e-12)
        fine = math.isfinite(norm) and norm <= DIVERGENCE_RATIO * (self.first_norm or math.inf)
        if self.warned or self.first_norm is None or fine:
            return
        self.warned = True
        named = {id(p): n for n, p in self.model.named_parameters()}
        worst = max((p for p in self.params if p.grad is not None), key=lambda p: float(p.grad.abs().max().nan_to_num(
            math.inf)), default=None)
        where = f", largest in {named.get(id(worst), '?')}" if worst is not None else ""
        frozen = self.freeze_step is not None and self.step >= self.freeze_step
        remedies = ["clip gradients (train.grad_clip, --grad-clip)", f"lower the learning rate (now {self.spec.lr:g})"]
        if self.bns and not frozen:  # fine-tuning a trained net: fixed statistics; from scratch, BN must train
            remedies.insert(0, "when fine-tuning a trained network, freeze BatchNorm (train.freeze_bn, --freeze-bn)")
        elif frozen:
            remedies.insert(0, "let BatchNorm train longer (a later train.freeze_bn, or none)")
        warnings.warn(f"training is diverging: gradient norm {norm:.3g} at step {self.step} against "
                      f"{self.first_norm:.3g} at the first step{where}. Try: {'; '.join(remedies)}", stacklevel=2)

    def save(self, m: dict) -> None:
        """``last.pt`` (atomic) and one more line of ``metrics.jsonl``."""
        sched = self.scheduler
        save_torch({"format": TRAIN_FORMAT, "epoch": m["epoch"], "step": self.step, "spec": asdict(self.spec),
                    "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "scheduler": _plain(sched.state_dict()) if sched is not None else None,
                    "scaler": self.scaler.state_dict() if self.use_amp else None, "rng": _rng_state(),
                    "history": self.history}, self.ckpt_path)
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(m) + "\n")


def _epoch_metrics(run: _Run, epoch: int, sums: tuple[float, float, float], t0: float) -> dict:
    train_seconds = time.time() - t0
    loss_sum, correct, seen = sums
    _check_finite_loss(loss_sum, epoch, run.spec, run.ckpt_path)
    test = evaluate(run.eval_model, run.test_loader)
    n = max(1.0, seen)
    if run.task is None:
        scores = {"train_top1": 100.0 * correct / n, "test_loss": test["loss"], "test_top1": test["top1"]}
    else:  # a detector: its mAP figures
        scores = {"test_loss": test["loss"], **{f"test_{k}": test[k] for k in _DETECTION_FIGURES}}
    return {"epoch": epoch + 1, "train_loss": loss_sum / n, **scores, "lr": run.optimizer.param_groups[0]["lr"],
            "train_seconds": round(train_seconds, 3), "seconds": round(time.time() - t0, 3)}


_DETECTION_FIGURES = ("map_50", "map", "map_75")


def _to_device(y, device: torch.device):
    """Labels (a tensor) or detection targets (a list of dicts of tensors) on ``device``."""
    if isinstance(y, torch.Tensor):
        return y.to(device, non_blocking=True)
    return [{k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in t.items()}
            for t in y]


def epoch_line(m: dict, epochs: int) -> str:
    """The progress line of one epoch's metrics (top-1 for classifiers, mAP for detectors)."""
    if "test_top1" in m:
        return (f"epoch {m['epoch']}/{epochs}: train loss {m['train_loss']:.4f} top1 {m['train_top1']:.2f} | "
                f"test loss {m['test_loss']:.4f} top1 {m['test_top1']:.2f} ({m['seconds']:.1f} s)")
    return (f"epoch {m['epoch']}/{epochs}: train loss {m['train_loss']:.4f} | test loss {m['test_loss']:.4f} "
            f"mAP@0.5 {m['test_map_50']:.2f} mAP {m['test_map']:.2f} ({m['seconds']:.1f} s)")


def fit(model: nn.Module, bundle, spec: TrainSpec, out_dir: str | Path | None = None, *,
        loss_fn: Callable | None = None, param_groups: Callable | None = None,
        make_optimizer: Callable | None = None, step_hook: Callable | None = None,
        epoch_hook: Callable | None = None, resume: bool = False) -> dict:
    """Train ``model`` on ``bundle.train`` for ``spec.epochs`` epochs, evaluating on ``bundle.test``.

    Returns ``{"top1", "loss", "epochs", "seconds", "history"}`` (final test accuracy in percent, test loss,
    epochs done, training wall time of this call, per-epoch metrics); for a detector ``map_50``, ``map``,
    ``map_75`` and ``"metric": "map_50"`` take the place of ``top1``. See the module docstring.
    """
    if isinstance(spec, dict):
        spec = TrainSpec(**spec)
    check_spec(spec)
    with kernels.use(spec.kernels):
        return _fit(model, bundle, spec, out_dir, loss_fn, param_groups, make_optimizer, step_hook, epoch_hook,
                    resume)


def _fit(model, bundle, spec, out_dir, loss_fn, param_groups, make_optimizer, step_hook, epoch_hook, resume):
    run = _Run(model, bundle, spec, out_dir, loss_fn, param_groups, make_optimizer)
    if resume:
        run.resume()
    net = run.wrapped()
    if spec.compile:
        net = torch.compile(net)
        run.eval_model = torch.compile(run.model) if net is not run.model else net
    show = progress_enabled()
    t_start = time.time()
    if spec.epochs > run.start_epoch and run.main:
        progress_line(f"training {spec.epochs - run.start_epoch} epoch(s) of {run.steps_per_epoch} steps "
                      f"(batch {spec.batch_size}, {run.device})")
    if run.main and run.metrics_path is not None:
        _write_metrics(run.metrics_path, run.history)  # a resumed run keeps the lines of the epochs it restored
    for epoch in range(run.start_epoch, spec.epochs):
        t0 = time.time()
        sums = run.train_epoch(net, epoch, step_hook, show)
        m = _epoch_metrics(run, epoch, sums, t0)
        if epoch_hook is not None:
            epoch_hook(model, epoch, m)
        run.history.append(m)
        if run.main:
            progress_line(epoch_line(m, spec.epochs))
            if run.out is not None:
                run.save(m)
    model.train()
    if run.history:
        last = run.history[-1]
        if run.task is None:
            final = {"top1": last["test_top1"], "loss": last["test_loss"]}
        else:
            final = {**{k: last[f"test_{k}"] for k in _DETECTION_FIGURES}, "loss": last["test_loss"],
                     "metric": run.task.metric}
    else:
        res = evaluate(model, run.test_loader)
        final = {"top1": res["top1"], "loss": res["loss"]} if run.task is None else {
            **{k: res[k] for k in _DETECTION_FIGURES}, "loss": res["loss"], "metric": res["metric"]}
    return {**final, "epochs": len(run.history), "seconds": round(time.time() - t_start, 3),
            "history": run.history}


__all__ = ["SCHEDULES", "OPTIMIZERS", "check_spec", "cross_entropy_loss", "default_param_groups", "dist_info",
           "distributed_device", "epoch_line", "evaluate", "fit", "init_distributed", "is_main_process",
           "make_default_optimizer", "make_scheduler", "progress_enabled", "progress_line", "progress_mode"]
