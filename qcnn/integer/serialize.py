"""The plain-file form of an integer model: ``FILE.json`` (the operations) and ``FILE.npz`` (their tensors).

``FILE.json`` is :func:`describe`: ``{"format": "qcnn-integer", "version": 1, "input", "input_shape",
"outputs", "points", "meta", "ops"}``, each op ``{"id", "op", "inputs", "output", ...attributes, "tensors":
{name: npz key}}`` with npz keys ``"<id>.<name>"``. Weights of grids with at most 4 bits are stored two per
byte (``weight_storage: "int4-packed"``, ``weight_shape``; :func:`~qcnn.integer.requant.pack_int4`). The
format is the one written since the first release (version 1); :func:`read` loads every such file.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from qcnn.integer.ir import Op
from qcnn.integer.requant import pack_int4, unpack_int4
from qcnn.io import write_text, write_with

FORMAT = "qcnn-integer"
VERSION = 1
#: keys of a JSON op that are not attributes of the :class:`Op`
_OP_KEYS = ("id", "op", "inputs", "output", "tensors")
#: keys written for the storage of a packed weight only
_STORAGE_KEYS = ("weight_storage", "weight_shape")


def _stem(path: str | Path) -> Path:
    path = Path(path)
    return path.with_suffix("") if path.suffix in (".npz", ".json") else path


def describe(ops: list[Op], input_name: str, output_names: list[str], points: dict[str, str],
             input_shape: tuple[int, ...], meta: dict) -> dict:
    """JSON-able description of the graph (tensors are referenced by their npz key)."""
    desc_ops = []
    for i, op in enumerate(ops):
        d = {"id": i, "op": op.kind, "inputs": op.inputs, "output": op.output, **op.attrs}
        d["tensors"] = {k: f"{i}.{k}" for k in op.tensors}
        desc_ops.append(d)
    return {"format": FORMAT, "version": VERSION, "input": input_name, "input_shape": list(input_shape),
            "outputs": output_names, "points": points, "meta": meta, "ops": desc_ops}


def _packed(op: Op, name: str) -> bool:
    return name == "weight" and op.attrs.get("weight_bits", 8) <= 4


def write(desc: dict, ops: list[Op], path: str | Path) -> tuple[Path, Path]:
    """Write ``<path>.npz`` (the tensors of ``ops``) and ``<path>.json`` (``desc``, from :func:`describe`)."""
    stem = _stem(path)
    arrays = {}
    for i, op in enumerate(ops):
        for k, t in op.tensors.items():
            a = t.detach().cpu().numpy()
            if _packed(op, k):
                arrays[f"{i}.{k}"] = pack_int4(a, op.attrs["weight_qmin"])
                desc["ops"][i]["weight_storage"] = "int4-packed"
                desc["ops"][i]["weight_shape"] = list(a.shape)
            else:
                arrays[f"{i}.{k}"] = a
    npz, js = stem.with_suffix(".npz"), stem.with_suffix(".json")
    npz.parent.mkdir(parents=True, exist_ok=True)
    write_with(npz, lambda f: np.savez(f, **arrays))
    write_text(js, json.dumps(desc, indent=1))
    return npz, js


def _read_op(d: dict, arrays) -> Op:
    attrs = {k: v for k, v in d.items() if k not in _OP_KEYS and k not in _STORAGE_KEYS}
    tensors = {}
    for k, key in d["tensors"].items():
        a = arrays[key]
        if k == "weight" and d.get("weight_storage") == "int4-packed":
            a = unpack_int4(a, d["weight_qmin"], tuple(d["weight_shape"]))
        tensors[k] = torch.from_numpy(np.array(a))
    return Op(d["op"], d["inputs"], d["output"], attrs, tensors)


def read(path: str | Path) -> dict:
    """The constructor arguments of :class:`~qcnn.integer.runtime.IntegerModel` stored by :func:`write`
    (needs only the ``.npz`` and ``.json`` files)."""
    stem = _stem(path)
    desc = json.loads(stem.with_suffix(".json").read_text())
    if desc.get("format") != FORMAT:
        raise ValueError(f"{stem.with_suffix('.json')} is not a qcnn integer model description")
    if desc.get("version", VERSION) > VERSION:
        raise ValueError(f"{stem.with_suffix('.json')}: format version {desc['version']} is newer than this "
                         f"qcnn reads ({VERSION})")
    with np.load(stem.with_suffix(".npz")) as arrays:
        ops = [_read_op(d, arrays) for d in desc["ops"]]
    return {"ops": ops, "input_name": desc["input"], "output_names": desc["outputs"], "points": desc["points"],
            "input_shape": tuple(desc["input_shape"]), "meta": desc["meta"]}


__all__ = ["FORMAT", "VERSION", "describe", "read", "write"]
