"""Reptile: the meta-update, adaptation to a target, and transfer between readouts."""

import copy
from contextlib import nullcontext

import numpy as np
import pytest
import torch

from showers.readout import get_readout
from showers.simulator import ShowerSimulator
from trainers.data import ShowerData, split_validation
from trainers.bank import Bank
from trainers.reptile import ReptileConfig, load_compatible, meta_train, steps_to_target, validation_loss
from zoo import create_model


@pytest.fixture(scope="module")
def tasks():
    ro = get_readout("g4-pbwo4")
    energies = np.repeat([4096.0, 32768.0], 60)
    out = {}
    for i, medium in enumerate(("PbWO4", "W")):
        x = ShowerSimulator(ro, medium, "e-").simulate(energies, seed=i)
        out[medium] = split_validation(ShowerData(x, energies, ro, medium), 0.25, 15, seed=0)
    return out


def vae(seed=0):
    torch.manual_seed(seed)
    return create_model("par04_vae_pbwo4", batch_size=16)


def test_meta_update_moves_epsilon_of_the_way(tasks):
    train = {"PbWO4": tasks["PbWO4"][0]}
    base = vae()
    # epsilon = 1: the meta-parameters are those of plain training on the task
    full = copy.deepcopy(base)
    meta_train(full, train, ReptileConfig(meta_iterations=1, inner_steps=3, meta_lr=1.0, anneal=False, progress=False))
    plain = copy.deepcopy(base)
    bank = Bank([plain], [train["PbWO4"]], seeds=[0])  # a task's inner loop: the ordinary step, seeded alike
    for _ in range(3):
        bank.step(nullcontext)
    bank.unstacked(0)
    for k, v in plain.state_dict().items():
        torch.testing.assert_close(full.state_dict()[k], v, rtol=1e-6, atol=1e-7)  # before + (after - before)
    # epsilon = 0.5: half way
    half = copy.deepcopy(base)
    meta_train(half, train, ReptileConfig(meta_iterations=1, inner_steps=3, meta_lr=0.5, anneal=False, progress=False))
    for k, v in base.state_dict().items():
        if v.is_floating_point():
            torch.testing.assert_close(half.state_dict()[k], 0.5 * (v + plain.state_dict()[k]), rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(v, base.state_dict()[k]) for k, v in half.state_dict().items())


def test_steps_to_target(tasks):
    tr, va = tasks["W"]
    model = vae()
    start = validation_loss(model, va)
    assert validation_loss(model, va) == start  # deterministic
    assert steps_to_target(copy.deepcopy(model), tr, va, target=start, max_steps=50)["steps"] == 0
    res = steps_to_target(model, tr, va, target=-1e9, max_steps=50, eval_every=25)
    assert res["steps"] is None and [s for s, _ in res["curve"]] == [0, 25, 50]
    assert res["curve"][-1][1] < start  # it trained


def test_reptile_refuses_adversarial_models(tasks):
    gan = create_model("fastcalogan_pbwo4")
    with pytest.raises(ValueError, match="likelihood"):
        meta_train(gan, {"PbWO4": tasks["PbWO4"][0]}, ReptileConfig(meta_iterations=1, progress=False))


def test_load_compatible_transfers_voxel_independent_layers():
    src = vae(1)
    dst = create_model("par04_vae_pbwo4", readout="calochallenge-1-photons")  # 368 voxels, not 6480
    loaded, skipped = load_compatible(dst, src.state_dict())
    assert "encoder.0.weight" in skipped and "to_voxels.weight" in skipped
    assert "decoder.0.weight" in loaded and "to_mu.weight" in loaded
    torch.testing.assert_close(dst.state_dict()["decoder.0.weight"], src.state_dict()["decoder.0.weight"])
