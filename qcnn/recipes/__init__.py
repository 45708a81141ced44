"""Recipes are data: which method, how many bits where, how to calibrate and how to train.

A recipe loads from YAML or a dict, and every key is checked: an unknown key is refused with the list of
valid ones. CLI flags override fields with :meth:`Recipe.replace`. One recipe per method ships inside the
package (``qcnn/recipes/data/<name>.yaml``) and loads by name from any directory: ``load_recipe("pact")``,
``qcnn qat --recipe pact`` (also ``pact.yaml``, ``recipes/pact.yaml`` or a path to any YAML file; see
:func:`find_recipe`). ``$QCNN_RECIPES`` adds folders of one's own recipes, looked up first.

Example (``pact``)::

    method: pact
    w_bits: 4
    a_bits: 4
    first_last: 8bit
    params: {alpha_init: 10.0, alpha_decay: 0.0002}
    train: {epochs: 2, optimizer: sgd, lr: 0.01, schedule: cosine}
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from qcnn.quant.base import check_bits

FIRST_LAST = ("fp32", "8bit", "same")


_SCALARS = {"int": int, "float": float, "bool": bool, "str": str}


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (PyYAML keeps the last one silently:
    ``w_bits: 4`` then ``w_bits: 2`` would quietly train 2-bit weights)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` (its keys may be overridden)
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:  # unhashable key: the base class reports it
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError("while constructing a mapping", node.start_mark,
                                                        f"found duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def _check_value(key: str, value, annotation: str, where: str):
    """``value`` of field ``key`` checked (and a numeric string coerced for a float field) against the
    field's annotation; a ValueError names the place, the key and the value."""
    kinds = [a.strip() for a in annotation.split("|")]
    if value is None and "None" in kinds:
        return value
    for kind in kinds:
        if kind == "float" and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if kind == "float" and isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if kind in ("int", "bool", "str") and type(value) is _SCALARS[kind]:
            return value
        if kind not in _SCALARS and kind != "None":  # containers / nested specs: checked where they are built
            return value
    raise ValueError(f"{where}: {key}={value!r} must be {' or '.join(kinds)} (got {type(value).__name__})")


def checked_fields(cls, d: dict | None, where: str, unknown: str | None = None) -> dict:
    """The mapping ``d`` for the dataclass ``cls``: unknown keys refused with the valid ones listed, every value
    checked against its field's annotation (:func:`_check_value`). The one options mechanism of qcnn: recipes,
    their ``train`` and ``overrides``, method ``params`` and procedure ``procedure_params`` all go through it.
    ``unknown`` replaces the start of the unknown-key message (default ``unknown key(s) [...] in <where>``)."""
    if d is not None and not isinstance(d, dict):
        raise ValueError(f"{where} must be a mapping of keys to values, got {type(d).__name__} {d!r}")
    d = dict(d or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    bad = sorted(set(d) - set(fields))
    if bad:
        head = f"{unknown} {bad}" if unknown else f"unknown key(s) {bad} in {where}"
        raise ValueError(f"{head}; valid keys: {sorted(fields) or 'none'}")
    for k, v in d.items():
        ann = fields[k].type if isinstance(fields[k].type, str) else getattr(fields[k].type, "__name__", "")
        d[k] = _check_value(k, v, ann, where)
    return d


@dataclass
class Override:
    """Per-layer override, matched by ``fnmatch`` pattern on the module name (e.g. ``layer3.*``)."""

    pattern: str
    w_bits: int | None = None
    a_bits: int | None = None
    skip: bool = False  #: leave matching layers in float


@dataclass
class TrainSpec:
    """Training hyper-parameters (used by ``qcnn train`` / ``qcnn qat``)."""

    epochs: int = 1
    batch_size: int = 128
    optimizer: str = "sgd"  #: sgd | adam
    lr: float = 0.01
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "cosine"  #: constant | step | cosine | onecycle
    step_size: int = 30
    gamma: float = 0.1
    augment: bool = True
    amp: bool = False
    #: quantizer kernels while training: ``eager`` or ``fused`` (compiled, :mod:`qcnn.quant.kernels`); None: the
    #: process's mode (``$QCNN_KERNELS``, default eager)
    kernels: str | None = None
    #: train (and evaluate) ``torch.compile(model)``: the whole quantized network fused by inductor
    compile: bool = False
    #: epochs (fractions allowed) after which every BatchNorm stops updating its running statistics and
    #: normalises with them for the rest of training (torch.ao's ``freeze_bn_stats``); 0: from the first step
    #: (the statistics QAT calibration re-estimated on the quantized network). None: BN trains throughout
    freeze_bn: float | None = None
    #: clip the global gradient norm to this value before every optimiser step (None: no clipping)
    grad_clip: float | None = None

    def __post_init__(self):  # built directly, it is checked as a recipe's ``train:`` mapping is
        for f in dataclasses.fields(self):
            setattr(self, f.name, _check_value(f.name, getattr(self, f.name), f.type, "train"))
        if self.freeze_bn is not None and not (self.freeze_bn >= 0 and math.isfinite(self.freeze_bn)):
            raise ValueError(f"train: freeze_bn={self.freeze_bn!r} must be a number of epochs >= 0 (or None)")
        if self.grad_clip is not None and not (self.grad_clip > 0 and math.isfinite(self.grad_clip)):
            raise ValueError(f"train: grad_clip={self.grad_clip!r} must be a positive number (or None)")
        if self.kernels is not None:
            from qcnn.quant.kernels import check_mode

            check_mode(self.kernels)


ROUNDINGS = ("nearest", "adaround", "brecq")
BIAS_CORRECTIONS = ("empirical", "analytic")


@dataclass
class PTQSpec:
    """Post-training steps (``ptq:`` in a recipe; ``qcnn ptq`` flags of the same names), applied in this order:
    cross-layer equalization (+ high-bias absorption), power-of-two alignment, calibration, learned rounding,
    DC-preserving rounding (keep_dc), bias correction, then
    the mixed-precision search. See docs/ptq.md."""

    #: extra views of the calibration images for every step after quantize(): their mirror images and this many
    #: random resized crops of each (:func:`qcnn.data.augment.calibration_views`; 0: the images alone)
    calib_augment: int = 0
    equalize: bool = False  #: cross-layer equalization (Nagel et al. 2019), data-free; needs fold_bn
    absorb_bias: bool = True  #: with ``equalize``: high-bias absorption on calibration data
    #: with ``equalize``: a ReLU6 between two equalized layers becomes a per-channel ``clip`` (exact), a ``relu``
    #: (Nagel et al.; changes the function above 6) or the pair is ``skip``-ped
    equalize_relu6: str = "clip"
    #: scale each rescalable activation so that its calibrated step on a power-of-two grid (QCode) is its free
    #: optimum (:func:`qcnn.methods.equalize.align_pot_activations`), on calibration data
    pot_align: bool = False
    bias_correction: str | None = None  #: empirical | analytic (None: off)
    round: str = "nearest"  #: nearest | adaround (layer-wise) | brecq (block reconstruction)
    #: round each spatial kernel so that its sum (DC gain) stays within half a step of the float one
    #: (:mod:`qcnn.methods.kernel_sums`), after nearest or learned rounding
    keep_dc: bool = False
    round_iterations: int = 1000  #: optimisation steps per layer (adaround) or block (brecq)
    #: learned rounding: Adam step of the rounding variables (None: ``max(4e-3, 10 / round_iterations)``)
    round_lr: float | None = None
    round_drop_prob: float = 0.0  #: QDrop: probability of feeding a float activation during reconstruction
    #: learned rounding: Adam step of the activation quantizers' steps learned with it (BRECQ / QDrop; 0: off)
    round_act_lr: float = 0.0
    mixed_precision: str | None = None  #: size / BOPs budget, e.g. ``size:200KB``, ``bops:2G``, ``0.6x``
    mp_candidates: list[int] = field(default_factory=lambda: [8, 6, 4])  #: weight bits the search may pick

    def __post_init__(self):
        for f in dataclasses.fields(self):
            if f.name != "mp_candidates":
                setattr(self, f.name, _check_value(f.name, getattr(self, f.name), f.type, "ptq"))
        if self.equalize_relu6 not in ("clip", "relu", "skip"):
            raise ValueError(f"ptq: equalize_relu6={self.equalize_relu6!r} is not one of ('clip', 'relu', 'skip')")
        if self.round not in ROUNDINGS:
            raise ValueError(f"ptq: round={self.round!r} is not one of {ROUNDINGS}")
        if self.bias_correction is not None and self.bias_correction not in BIAS_CORRECTIONS:
            raise ValueError(f"ptq: bias_correction={self.bias_correction!r} is not one of {BIAS_CORRECTIONS}")
        if self.calib_augment < 0:
            raise ValueError(f"ptq: calib_augment={self.calib_augment!r} must be >= 0")
        if self.round_iterations < 1:
            raise ValueError(f"ptq: round_iterations={self.round_iterations!r} must be >= 1")
        if not 0.0 <= self.round_drop_prob < 1.0:
            raise ValueError(f"ptq: round_drop_prob={self.round_drop_prob!r} must lie in [0, 1)")
        if self.round_lr is not None and not (math.isfinite(self.round_lr) and self.round_lr > 0.0):
            raise ValueError(f"ptq: round_lr={self.round_lr!r} must be positive")
        if not (math.isfinite(self.round_act_lr) and self.round_act_lr >= 0.0):
            raise ValueError(f"ptq: round_act_lr={self.round_act_lr!r} must be >= 0")
        if not isinstance(self.mp_candidates, (list, tuple)) or not self.mp_candidates:
            raise ValueError(f"ptq: mp_candidates={self.mp_candidates!r} must be a non-empty list of bit widths")
        self.mp_candidates = [check_bits(b, "ptq: mp_candidates") for b in self.mp_candidates]

    @property
    def steps(self) -> list[str]:
        """The enabled steps, in the order they run (recorded in checkpoints and reports)."""
        out = [f"calib_augment:{self.calib_augment}"] if self.calib_augment else []
        out += ["equalize"] if self.equalize else []
        out += ["absorb_bias"] if self.equalize and self.absorb_bias else []
        out += ["pot_align"] if self.pot_align else []
        out += [] if self.round == "nearest" else [self.round]
        out += ["keep_dc"] if self.keep_dc else []
        out += [f"bias_correction:{self.bias_correction}"] if self.bias_correction else []
        return out + ([f"mixed_precision:{self.mixed_precision}"] if self.mixed_precision else [])


@dataclass
class Recipe:
    method: str = "uniform"
    w_bits: int = 8
    a_bits: int | None = 8  #: None = activations stay float (weight-only quantization with this method)
    g_bits: int | None = None  #: gradient bits (DoReFa G, WAGE G)
    e_bits: int | None = None  #: error bits (WAGE E)
    first_last: str = "8bit"  #: fp32 | 8bit | same
    per_channel: bool = True
    calib: str = "minmax"
    calib_images: int = 1024
    fold_bn: bool = False
    quantize_adds: bool = True
    params: dict[str, Any] = field(default_factory=dict)  #: method options
    procedure: str | None = None  #: training procedure in qcnn.methods (two_step, progressive, ...)
    procedure_params: dict[str, Any] = field(default_factory=dict)
    overrides: list[Override] = field(default_factory=list)
    train: TrainSpec = field(default_factory=TrainSpec)
    ptq: PTQSpec = field(default_factory=PTQSpec)  #: post-training steps (equalization, rounding, ...)

    def __post_init__(self):
        for f in dataclasses.fields(self):  # e.g. Recipe(per_channel="no") is refused, not taken as True
            if f.name not in ("params", "procedure_params", "overrides", "train", "ptq"):
                setattr(self, f.name, _check_value(f.name, getattr(self, f.name), f.type, "recipe"))
        check_bits(self.w_bits, "w_bits")
        if self.a_bits is not None:
            check_bits(self.a_bits, "a_bits")
        if self.g_bits is not None:
            check_bits(self.g_bits, "g_bits")
        if self.e_bits is not None:
            check_bits(self.e_bits, "e_bits")
        if isinstance(self.calib_images, bool) or not isinstance(self.calib_images, int) or self.calib_images < 1:
            raise ValueError(f"calib_images={self.calib_images!r} must be a positive integer")
        if self.first_last not in FIRST_LAST:
            raise ValueError(f"first_last={self.first_last!r} is not one of {FIRST_LAST}")
        if not isinstance(self.overrides, (list, tuple)):
            raise ValueError(f"overrides={self.overrides!r} must be a list of {{pattern: ..., w_bits: ...}} mappings")
        self.overrides = [o if isinstance(o, Override) else Override(**checked_fields(Override, o, "override"))
                          for o in self.overrides]
        for o in self.overrides:
            if o.w_bits is not None:
                check_bits(o.w_bits, f"w_bits of override {o.pattern!r}")
            if o.a_bits is not None:
                check_bits(o.a_bits, f"a_bits of override {o.pattern!r}")
        if not isinstance(self.train, TrainSpec):
            self.train = TrainSpec(**checked_fields(TrainSpec, self.train, "train"))
        if not isinstance(self.ptq, PTQSpec):
            self.ptq = PTQSpec(**checked_fields(PTQSpec, self.ptq, "ptq"))
        for key in ("params", "procedure_params"):
            if not isinstance(getattr(self, key), dict):
                raise ValueError(f"{key}={getattr(self, key)!r} must be a mapping of option names to values")

    @classmethod
    def from_dict(cls, d: dict, where: str = "recipe") -> Recipe:
        if not isinstance(d, dict):  # None too: an absent recipe is not the default one
            raise ValueError(f"{where} must be a mapping of keys to values, got {type(d).__name__} {d!r}")
        d = checked_fields(cls, d, where)
        if "train" in d and not isinstance(d["train"], TrainSpec):
            d["train"] = TrainSpec(**checked_fields(TrainSpec, d["train"], f"{where}, train"))
        if "ptq" in d and not isinstance(d["ptq"], PTQSpec):
            d["ptq"] = PTQSpec(**checked_fields(PTQSpec, d["ptq"], f"{where}, ptq"))
        if isinstance(d.get("overrides"), list):
            d["overrides"] = [Override(**checked_fields(Override, o, f"{where}, override {i}"))
                              if isinstance(o, dict) else o for i, o in enumerate(d["overrides"])]
        return cls(**d)

    @classmethod
    def from_yaml(cls, path: str | Path) -> Recipe:
        """The recipe in the YAML file ``path``; a missing ``recipes/<name>.yaml`` (the folder the recipes
        were read from before they shipped in the package) is the packaged recipe ``<name>``."""
        path = Path(path).expanduser()
        if path.is_dir():
            raise ValueError(f"recipe {str(path)!r} is a directory, not a recipe file")
        if not path.is_file():
            path = _packaged_fallback(path) or path
        if not path.is_file():
            raise FileNotFoundError(f"recipe file {str(path)!r} does not exist")
        try:
            d = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
        except UnicodeDecodeError as e:
            raise ValueError(f"recipe {str(path)!r} is not UTF-8 text ({e})") from None
        except yaml.YAMLError as e:
            raise ValueError(f"recipe {str(path)!r} is not valid YAML: {' '.join(str(e).split())}") from None
        if d is None:
            raise ValueError(f"recipe {str(path)!r} is empty: it needs at least `method:`")
        if not isinstance(d, dict):
            raise ValueError(f"recipe {str(path)!r} must be a mapping, got {type(d).__name__}")
        return cls.from_dict(d, where=f"recipe {str(path)!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> Recipe:
        """A copy with the non-None ``changes`` applied (``train`` may be a partial dict)."""
        changes = {k: v for k, v in changes.items() if v is not None}
        train = changes.pop("train", None)
        ptq = changes.pop("ptq", None)
        r = dataclasses.replace(self, **changes)
        if train:
            r.train = dataclasses.replace(r.train, **checked_fields(TrainSpec, train, "train"))
        if ptq:
            r.ptq = dataclasses.replace(r.ptq, **checked_fields(PTQSpec, ptq, "ptq"))
        return r


#: the recipes shipped with qcnn (package data: ``qcnn/recipes/data/*.yaml``)
PACKAGED_RECIPES = Path(__file__).resolve().parent / "data"
_SUFFIXES = (".yaml", ".yml")


def recipe_dirs() -> list[Path]:
    """Where named recipes are looked up, in order: the folders of ``$QCNN_RECIPES`` (``os.pathsep``
    separated), then the recipes shipped in the package."""
    import os

    dirs = [Path(p).expanduser() for p in os.environ.get("QCNN_RECIPES", "").split(os.pathsep) if p]
    dirs.append(PACKAGED_RECIPES)
    return dirs


def list_recipes() -> list[str]:
    """The names :func:`load_recipe` accepts (``pact``, ``lsq``, ...), sorted."""
    return sorted({p.stem for d in recipe_dirs() if d.is_dir() for p in d.iterdir()
                   if p.suffix in _SUFFIXES and p.is_file()})


def _named(name: str) -> Path | None:
    for d in recipe_dirs():
        for suffix in _SUFFIXES:
            if (d / f"{name}{suffix}").is_file():
                return d / f"{name}{suffix}"
    return None


def _packaged_fallback(path: Path) -> Path | None:
    """The named recipe a missing ``recipes/<name>.yaml`` (relative or absolute) or ``<name>.yaml`` stands for."""
    if path.suffix not in _SUFFIXES or not (len(path.parts) == 1 or path.parent.name == "recipes"):
        return None
    return _named(path.stem)


def _available(name: str) -> str:
    """``did you mean 'pact'? available recipes: bireal, clipq, ...`` for the name ``name`` not found."""
    import difflib

    names = list_recipes()
    close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
    return f"{hint}available recipes: {', '.join(names) or 'none'}"


def find_recipe(name_or_path: str | Path) -> Path:
    """The file of a recipe given by name or path, from any working directory.

    * an existing file is itself: ``/abs/my.yaml``, ``./runs/r.yaml``;
    * a name is looked up in :func:`recipe_dirs`: ``pact``, and ``pact.yaml`` or ``recipes/pact.yaml`` when no
      such file exists (the repository's former ``recipes/`` folder, now shipped in the package);
    * anything else is refused: an unknown name with the available names (and the close ones), a missing file
      with its path.
    """
    p = Path(name_or_path).expanduser()
    if p.is_file():
        return p
    text = str(name_or_path)
    if p.suffix not in _SUFFIXES and len(p.parts) == 1:  # a bare name
        found = _named(text)
        if found is None:
            raise ValueError(f"unknown recipe {text!r}; {_available(text)}")
        return found
    found = _packaged_fallback(p)
    if found is not None:
        return found
    if p.is_dir():
        raise ValueError(f"recipe {text!r} is a directory, not a recipe file")
    if p.suffix in _SUFFIXES and (len(p.parts) == 1 or p.parent.name == "recipes"):  # a name, not found
        raise FileNotFoundError(f"recipe file {text!r} does not exist and {p.stem!r} is not a named recipe; "
                                f"{_available(p.stem)}")
    raise FileNotFoundError(f"recipe file {text!r} does not exist; named recipes: {', '.join(list_recipes())}")


def load_recipe(name_or_path: str | Path) -> Recipe:
    """The recipe of :func:`find_recipe` (``load_recipe("pact")``, ``load_recipe("runs/my.yaml")``)."""
    return Recipe.from_yaml(find_recipe(name_or_path))


__all__ = ["BIAS_CORRECTIONS", "checked_fields", "FIRST_LAST", "Override", "PACKAGED_RECIPES", "PTQSpec", "Recipe",
           "ROUNDINGS", "TrainSpec", "find_recipe", "list_recipes", "load_recipe", "recipe_dirs"]
