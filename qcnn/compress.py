"""Compressed model files (``.qcz``): bit-packed codebook indices, sparsity patterns, per-layer codebooks.

A ``.qcz`` file is a ``torch.save`` dict that loads with ``torch.load(weights_only=True)``::

    {"format": "qcnn-compressed/1",
     "arch": {...} | None, "recipe": {...} | None, "metrics": {...} | None,   # as in qcnn-model/1
     "layers": [ {per-layer description, plain ints/strings/lists} ... ],
     "blob":   uint8 tensor: every compressed weight's bytes, one after the other,
     "state":  {name: tensor}: everything else (BN, biases, quantizer state) in fp32 (fp16 with half=True)}

Each quantized conv/linear weight (a ``QConv2d``/``QLinear`` with a weight quantizer) is stored as one of

* ``codebook``: its distinct values ``L`` (sorted fp32, the codebook actually used, at most ``2^b``) and one
  of three layouts, the smallest for that layer:

  - ``dense``:   ``ceil(log2 |L|)`` bits per weight (zero is a codebook entry like any other);
  - ``bitmask``: one bit per weight (non-zero or not), then ``ceil(log2 |L \\ {0}|)`` bits per non-zero;
  - ``csr``:     relative indexing (Han et al., Deep Compression): per stored entry a ``g``-bit count of
    the zeros skipped since the previous entry and a code into ``L U {0}``; a gap longer than ``2^g - 1``
    is bridged by filler entries holding an explicit zero; ``g`` in 1..8 is chosen per layer.

* ``affine``: a uniform grid ``value = scale * (code - zero_point)`` (per tensor or per channel): dense
  ``b``-bit codes plus the fp32 scales and int32 zero points. A grid whose codes are a sparse integer set
  (``Grid.int_levels``, e.g. the binary ``{-1, +1}`` of Bi-Real / ELQ / WAGE) stores each code as its
  index into that set, ``ceil(log2 |int_levels|)`` bits (1 bit for ``{-1, +1}``: ``index = (code + 1) / 2``),
  the set itself in the description (``int_levels``) and no zero-point section when every zero point is 0:
  a binary conv of ``n`` weights and ``C`` output channels takes ``ceil(n / 8) + 4 C`` bytes.

The layer bytes are ``codebook + pattern + codes`` (``affine``: ``codes + scales + zero points``) rounded
up to whole bytes per section. Decoding gives back the quantized weights bit for bit; the file is written
atomically. :func:`load_compressed` rebuilds the model (architecture + recipe, as
:func:`qcnn.checkpoint.load_model` does); a codebook layer gets a :class:`~qcnn.quant.codebook.FixedCodebook`
weight quantizer holding its levels.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from qcnn.checkpoint import build_from_arch, load_checkpoint, save_atomic
from qcnn.nn.layers import QConv2d, QLinear
from qcnn.quant.base import Grid
from qcnn.quant.codebook import FixedCodebook

FORMAT = "qcnn-compressed/1"
_QUANT_PREFIXES = ("weight_quant.", "input_quant.", "out_quant.")


# -- bit packing -------------------------------------------------------------------------------
def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned integers ``< 2^bits`` into bytes, ``bits`` per value, little-endian bit order."""
    values = np.asarray(values, dtype=np.int64).reshape(-1)
    if bits == 0 or values.size == 0:
        return np.zeros(0, dtype=np.uint8)
    if values.min(initial=0) < 0 or values.max(initial=0) >= 2**bits:
        raise ValueError(f"values out of range for {bits}-bit packing: [{values.min()}, {values.max()}]")
    planes = ((values[:, None] >> np.arange(bits)) & 1).astype(np.uint8)
    return np.packbits(planes.reshape(-1), bitorder="little")


def unpack_bits(buf: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: ``count`` integers of ``bits`` bits each."""
    if bits == 0 or count == 0:
        return np.zeros(count, dtype=np.int64)
    flat = np.unpackbits(np.asarray(buf, dtype=np.uint8), count=count * bits, bitorder="little")
    planes = flat.reshape(count, bits).astype(np.int64)
    return (planes << np.arange(bits)).sum(axis=1)


def _nbits(n: int) -> int:
    """Bits to index ``n`` symbols (0 for one symbol)."""
    return max(0, math.ceil(math.log2(n))) if n > 1 else 0


def _nbytes(bits: int) -> int:
    return (bits + 7) // 8


# -- one layer ----------------------------------------------------------------------------------
def _csr_entries(pos: np.ndarray, g: int) -> tuple[np.ndarray, np.ndarray]:
    """(gap per entry, index of the non-zero it carries or -1 for a filler) for relative indexing."""
    prev = np.concatenate([[-1], pos[:-1]])
    gaps = pos - prev - 1
    span = 2**g
    fill = gaps // span
    n_entries = len(pos) + int(fill.sum())
    out_gap = np.empty(n_entries, dtype=np.int64)
    out_idx = np.empty(n_entries, dtype=np.int64)
    j = 0
    for i, (d, f) in enumerate(zip(gaps.tolist(), fill.tolist(), strict=True)):
        for _ in range(f):
            out_gap[j], out_idx[j] = span - 1, -1
            j += 1
        out_gap[j], out_idx[j] = d - f * span, i
        j += 1
    return out_gap, out_idx


def _csr_size(pos: np.ndarray, g: int, vbits: int) -> int:
    prev = np.concatenate([[-1], pos[:-1]])
    entries = len(pos) + int(((pos - prev - 1) // 2**g).sum())
    return _nbytes(entries * g) + _nbytes(entries * vbits)


def encode_codebook(w: torch.Tensor) -> tuple[dict, bytes]:
    """Encode a weight tensor by its distinct values; returns (description, payload)."""
    flat = w.detach().cpu().float().reshape(-1).numpy()
    levels, codes = np.unique(flat, return_inverse=True)
    levels = levels.astype(np.float32)
    n = flat.size
    has_zero = bool(np.any(levels == 0))
    zero_code = int(np.searchsorted(levels, 0.0)) if has_zero else -1
    nonzero = codes != zero_code
    pos = np.flatnonzero(nonzero)
    nnz = int(pos.size)
    lv_bytes = levels.size * 4
    # dense
    dbits = _nbits(levels.size)
    sizes = {"dense": _nbytes(n * dbits)}
    # bitmask: codes into the non-zero levels
    nz_levels = levels.size - (1 if has_zero else 0)
    vbits = _nbits(nz_levels)
    sizes["bitmask"] = _nbytes(n) + _nbytes(nnz * vbits)
    # csr: codes into L U {0}
    csr_levels = levels if has_zero else np.sort(np.append(levels, np.float32(0.0)))
    cbits = max(1, _nbits(csr_levels.size))
    best_g = min(range(1, 9), key=lambda g: _csr_size(pos, g, cbits))
    sizes["csr"] = _csr_size(pos, best_g, cbits)
    enc = min(sizes, key=lambda k: (sizes[k], ("dense", "bitmask", "csr").index(k)))
    desc = {"kind": "codebook", "encoding": enc, "numel": n, "nnz": nnz}
    if enc == "dense":
        parts = [levels.tobytes(), pack_bits(codes, dbits).tobytes()]
        desc.update(n_levels=int(levels.size), code_bits=dbits)
    elif enc == "bitmask":
        nzc = codes[pos] - (codes[pos] > zero_code) if has_zero else codes[pos]
        parts = [levels.tobytes(), np.packbits(nonzero, bitorder="little").tobytes(),
                 pack_bits(nzc, vbits).tobytes()]
        desc.update(n_levels=int(levels.size), code_bits=vbits)
    else:
        lv = csr_levels
        gap, idx = _csr_entries(pos, best_g)
        zc = int(np.searchsorted(lv, 0.0))
        vals = np.where(idx >= 0, np.searchsorted(lv, flat[pos[np.maximum(idx, 0)]]), zc)
        parts = [lv.astype(np.float32).tobytes(), pack_bits(gap, best_g).tobytes(),
                 pack_bits(vals, cbits).tobytes()]
        desc.update(n_levels=int(lv.size), code_bits=cbits, gap_bits=best_g, entries=int(gap.size))
        lv_bytes = lv.size * 4
    desc["sections"] = [len(p) for p in parts]
    desc["codebook_bytes"] = lv_bytes
    return desc, b"".join(parts)


def decode_codebook(desc: dict, payload: np.ndarray) -> torch.Tensor:
    secs = np.cumsum([0] + list(desc["sections"]))
    part = [payload[secs[i]:secs[i + 1]] for i in range(len(desc["sections"]))]
    levels = np.frombuffer(part[0].tobytes(), dtype=np.float32)
    n, enc, bits = desc["numel"], desc["encoding"], desc["code_bits"]
    if enc == "dense":
        out = levels[unpack_bits(part[1], bits, n)] if n else np.zeros(0, np.float32)
    elif enc == "bitmask":
        mask = np.unpackbits(part[1], count=n, bitorder="little").astype(bool)
        nz_levels = levels[levels != 0]
        out = np.zeros(n, dtype=np.float32)
        out[mask] = nz_levels[unpack_bits(part[2], bits, int(mask.sum()))]
    elif enc == "csr":
        m = desc["entries"]
        gap = unpack_bits(part[1], desc["gap_bits"], m)
        vals = unpack_bits(part[2], bits, m)
        posn = np.cumsum(gap + 1) - 1
        out = np.zeros(n, dtype=np.float32)
        out[posn] = levels[vals]
    else:
        raise ValueError(f"unknown weight encoding {enc!r} in compressed file")
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32)).reshape(desc["shape"])


def encode_affine(w: torch.Tensor, grid) -> tuple[dict, bytes] | None:
    """Dense ``b``-bit codes of a uniform grid, or None if decoding would not be bit-exact."""
    w = w.detach().cpu().float()
    codes = grid.to_codes(w)
    back = grid.from_codes(codes).to(torch.float32)
    if not torch.equal(back, w):
        return None
    bits = grid.bits
    scale = grid.scale.detach().cpu().float().reshape(-1).numpy()
    zp = (grid.zero_point.detach().cpu().to(torch.int32).reshape(-1).numpy() if grid.zero_point is not None
          else np.zeros(1, np.int32))
    flat = codes.reshape(-1).numpy().astype(np.int64)
    extra = {}
    if grid.int_levels is not None:  # sparse code set (binary {-1, +1}): pack the index into the set
        lv = np.unique(grid.int_levels.detach().cpu().numpy().astype(np.int64))
        idx = np.clip(np.searchsorted(lv, flat), 0, lv.size - 1)
        if not np.array_equal(lv[idx], flat):
            return None
        bits = max(1, _nbits(lv.size))
        packed = pack_bits(idx, bits)
        if not zp.any():
            zp = np.zeros(0, np.int32)  # decoded as all-zero zero points
        extra = {"int_levels": [int(v) for v in lv], "n_levels": int(lv.size)}
    else:
        packed = pack_bits(flat - grid.qmin, bits)
    parts = [packed.tobytes(), scale.tobytes(), zp.tobytes()]
    desc = {"kind": "affine", "encoding": "dense", "numel": w.numel(), "nnz": int((w != 0).sum()),
            "code_bits": bits, "qmin": int(grid.qmin), "axis": grid.axis if scale.size > 1 else None,
            "sections": [len(p) for p in parts], "codebook_bytes": len(parts[1]) + len(parts[2]), **extra}
    return desc, b"".join(parts)


def decode_affine(desc: dict, payload: np.ndarray) -> torch.Tensor:

    secs = np.cumsum([0] + list(desc["sections"]))
    part = [payload[secs[i]:secs[i + 1]] for i in range(3)]
    raw = unpack_bits(part[0], desc["code_bits"], desc["numel"])
    if desc.get("int_levels") is not None:  # index into the stored code set
        codes = np.asarray(desc["int_levels"], dtype=np.int64)[raw]
    else:
        codes = raw + desc["qmin"]
    scale = torch.from_numpy(np.frombuffer(part[1].tobytes(), dtype=np.float32).copy())
    zp = torch.from_numpy(np.frombuffer(part[2].tobytes(), dtype=np.int32).copy())
    if zp.numel() == 0:  # zero-point section left out: all zero
        zp = torch.zeros_like(scale, dtype=torch.int32)
    axis = desc["axis"]
    if axis is None:
        scale, zp = scale.reshape(()), zp.reshape(())
    g = Grid(bits=desc["code_bits"], signed=True, scale=scale, zero_point=zp, axis=axis)
    q = torch.from_numpy(codes.astype(np.int32)).reshape(desc["shape"])
    return g.from_codes(q).to(torch.float32)


# -- whole model --------------------------------------------------------------------------------
def _quantized_weights(model: nn.Module) -> list[tuple[str, nn.Module]]:

    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, (QConv2d, QLinear)) and m.weight_quant is not None]


def _grid_of(m: nn.Module):
    try:
        return m.weight_quant.grid()
    except (NotImplementedError, TypeError, ValueError):
        return None


def fp32_state_bytes(model: nn.Module) -> int:
    """Bytes of ``torch.save`` of the model's float state_dict (fp32, quantizer state left out)."""
    sd = {k: (v.detach().cpu().float() if v.is_floating_point() else v.detach().cpu())
          for k, v in model.state_dict().items() if not any(p in k for p in _QUANT_PREFIXES)}
    buf = io.BytesIO()
    torch.save(sd, buf)
    return buf.tell()


@torch.no_grad()
def compress_model(model: nn.Module, path: str | Path, arch: dict | None = None, recipe: dict | None = None,
                   metrics: dict | None = None, half: bool = False) -> dict:
    """Write ``model`` (a quantized model) to ``path`` in the ``.qcz`` format; returns size statistics.

    Statistics: ``layers`` (per layer: name, shape, kind, encoding, levels, bits, zero fraction, bytes),
    ``weight_bytes`` / ``weight_fp32_bytes`` / ``weight_ratio`` for all conv/linear weights (float-kept ones
    count at their stored size), ``file_bytes`` / ``fp32_bytes`` / ``model_ratio`` for the whole model
    against ``torch.save`` of its fp32 state_dict.
    """

    model = getattr(model, "module", model)
    was_training = model.training
    model.eval()
    state = model.state_dict()
    layers, blobs, drop = [], [], set()
    offset = 0
    for name, m in _quantized_weights(model):
        key = f"{name}.weight" if name else "weight"
        wq = m.quantized_weight().detach().float().cpu()
        enc = None
        g = _grid_of(m)
        if g is not None and g.is_uniform:
            enc = encode_affine(wq, g)
        if enc is None:
            enc = encode_codebook(wq)
        desc, payload = enc
        desc.update(name=name, key=key, shape=list(wq.shape), offset=offset, nbytes=len(payload))
        layers.append(desc)
        blobs.append(payload)
        offset += len(payload)
        drop.add(key)
        if desc["kind"] == "codebook":  # the weight quantizer is replaced by a FixedCodebook on load
            drop.update(k for k in state if k.startswith(f"{name}.weight_quant."))
    rest = {}
    for k, v in state.items():
        if k in drop:
            continue
        v = v.detach().cpu()
        rest[k] = v.half() if half and v.is_floating_point() else v.clone()
    blob = torch.frombuffer(bytearray(b"".join(blobs)), dtype=torch.uint8) if offset else \
        torch.zeros(0, dtype=torch.uint8)
    obj = {"format": FORMAT, "arch": arch, "recipe": recipe, "metrics": dict(metrics) if metrics else None,
           "layers": layers, "blob": blob, "state": rest}
    path = save_atomic(obj, path)
    model.train(was_training)

    # statistics: every conv/linear weight, compressed or stored float
    weight_fp32 = weight_bytes = 0
    rows = []
    for desc in layers:
        n = desc["numel"]
        weight_fp32 += 4 * n
        weight_bytes += desc["nbytes"]
        rows.append({"name": desc["name"], "shape": desc["shape"], "kind": desc["kind"],
                     "encoding": desc["encoding"], "levels": desc.get("n_levels"), "code_bits": desc["code_bits"],
                     "zero_fraction": 1 - desc["nnz"] / max(n, 1), "bytes": desc["nbytes"],
                     "ratio": 4 * n / max(desc["nbytes"], 1)})
    done = {d["name"] for d in layers}
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)) and name not in done:
            n = m.weight.numel()
            stored = n * (2 if half else 4)
            weight_fp32 += 4 * n
            weight_bytes += stored
            rows.append({"name": name, "shape": list(m.weight.shape), "kind": "float", "encoding": "fp16" if half
                         else "fp32", "levels": None, "code_bits": 16 if half else 32,
                         "zero_fraction": float((m.weight == 0).float().mean()), "bytes": stored,
                         "ratio": 4 * n / stored})
    file_bytes = Path(path).stat().st_size
    fp32 = fp32_state_bytes(model)
    return {"path": str(path), "layers": rows, "weight_bytes": weight_bytes, "weight_fp32_bytes": weight_fp32,
            "weight_ratio": weight_fp32 / max(weight_bytes, 1), "file_bytes": file_bytes, "fp32_bytes": fp32,
            "model_ratio": fp32 / max(file_bytes, 1)}


def decode_weights(obj: dict) -> dict[str, torch.Tensor]:
    """``{state_dict key: quantized weight}`` of every compressed layer in a loaded ``.qcz`` dict."""
    blob = obj["blob"].numpy()
    out = {}
    for desc in obj["layers"]:
        payload = blob[desc["offset"]:desc["offset"] + desc["nbytes"]]
        if desc["kind"] == "codebook":
            out[desc["key"]] = decode_codebook(desc, payload)
        elif desc["kind"] == "affine":
            out[desc["key"]] = decode_affine(desc, payload)
        else:
            raise ValueError(f"unknown layer kind {desc['kind']!r} in compressed file")
    return out


def read_compressed(path: str | Path) -> dict:
    """Load a ``.qcz`` file (``weights_only``) and check its format."""

    obj = load_checkpoint(path)
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        fmt = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f"{str(path)!r} is not a compressed qcnn model (format {fmt!r}, expected {FORMAT!r})")
    return obj


def load_compressed(path: str | Path, device: str | torch.device = "cpu", model: nn.Module | None = None
                    ) -> tuple[nn.Module, dict]:
    """Rebuild the model stored in a ``.qcz`` file; returns ``(model in eval mode on device, info)``.

    The architecture (and recipe) come from the file, or pass ``model``: a model with the same structure
    (e.g. the quantized model that was compressed). ``info`` holds ``format``, ``arch``, ``recipe``,
    ``metrics`` and ``layers``.
    """

    obj = read_compressed(path)
    if model is None:
        if obj.get("arch") is None:
            raise ValueError(f"{str(path)!r} stores no architecture; pass the model to load it into")

        model = build_from_arch(obj["arch"], obj.get("recipe"))
    sd = {k: (v.float() if v.dtype == torch.float16 else v) for k, v in obj["state"].items()}
    weights = decode_weights(obj)
    sd.update(weights)
    for desc in obj["layers"]:
        if desc["kind"] != "codebook":
            continue
        m = model.get_submodule(desc["name"])
        lv = torch.unique(weights[desc["key"]])
        m.weight_quant = FixedCodebook(lv, bits=max(1, _nbits(lv.numel())))
        sd[f"{desc['name']}.weight_quant.levels"] = m.weight_quant.levels.clone()
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(f"{str(path)!r} does not match the model: missing keys {missing[:5]}, "
                         f"unexpected keys {unexpected[:5]}")
    info = {"format": FORMAT, "arch": obj.get("arch"), "recipe": obj.get("recipe"), "metrics": obj.get("metrics"),
            "layers": obj["layers"]}
    return model.to(device).eval(), info


__all__ = ["FORMAT", "compress_model", "decode_weights", "fp32_state_bytes", "load_compressed", "pack_bits",
           "read_compressed", "unpack_bits"]
