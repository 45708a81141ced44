"""ELQ procedure: frozen fraction follows the schedule, frozen weights never move, ternary at the end."""

from __future__ import annotations

import dataclasses

import torch

from qcnn.methods import run_recipe
from qcnn.methods.elq import elq_layers, stage_starts
from qcnn.models import build_model
from qcnn.recipes import Recipe


def test_stage_starts():
    assert stage_starts(100, 4) == [0, 25, 50, 75]
    assert stage_starts(7, 4) == [0, 2, 4, 5]


def test_elq_schedule_and_frozen_weights_on_fashion_mnist(fashion_dir):
    from qcnn.data import get_data
    from qcnn.train import fit

    b = get_data("fashion-mnist", fashion_dir, batch_size=64)
    b = dataclasses.replace(b, train=b.train.take(3200), test=b.test.take(1000), calib=b.calib.take(256))
    torch.manual_seed(0)
    model = build_model("lenet5", in_channels=1)
    spec = Recipe().train
    fit(model, b, dataclasses.replace(spec, epochs=1, lr=0.05, schedule="constant"))  # a float start
    recipe = Recipe.from_dict(dict(method="elq", w_bits=2, a_bits=None, first_last="fp32", procedure="elq",
                                   params=dict(criterion="loss", schedule=[0.5, 0.75, 0.875, 1.0], penalty=1e-4),
                                   train=dict(epochs=1, batch_size=64, lr=0.01, schedule="constant")))

    from qcnn.methods import elq as elq_mod

    seen: list[dict] = []
    original = elq_mod.freeze_all

    def spy(qmodel, fraction):  # record the frozen values when each stage starts
        out = original(qmodel, fraction)
        seen.append({n: (m.weight_quant.frozen.clone(), m.weight.detach().clone()) for n, m in elq_layers(qmodel)})
        return out

    elq_mod.freeze_all = spy
    try:
        q, metrics = run_recipe(model, b, recipe)
    finally:
        elq_mod.freeze_all = original
    steps = len(b.train)
    assert [s["step"] for s in metrics["stages"]] == stage_starts(steps, 4)
    assert [s["fraction"] for s in metrics["stages"]] == [0.5, 0.75, 0.875, 1.0]
    for s in metrics["stages"]:
        assert abs(s["frozen"] - s["fraction"]) < 1e-3
    final = dict(elq_layers(q))
    assert len(final) == 3  # conv2, fc1, fc2 (first/last layers in float)
    for snap in seen:  # weights frozen at any stage keep exactly their value to the end
        for n, (mask, w) in snap.items():
            assert torch.equal(final[n].weight.detach()[mask], w[mask])
    for m in final.values():
        codes = (m.weight.detach() / m.weight_quant.alpha).round()
        assert torch.allclose(m.weight.detach(), codes * m.weight_quant.alpha)
        assert set(codes.unique().tolist()) <= {-1.0, 0.0, 1.0}
    assert metrics["top1"] > 60.0
