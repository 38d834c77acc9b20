"""Banks: K models trained in lockstep equal the same models trained one by one (same seeds), with
regions of different voxel counts padded, for the GAN and the VAE families; banks resume exactly."""

import copy
from contextlib import nullcontext

import numpy as np
import pytest
import torch

from showers.detector import get_detector
from trainers.bank import make_bank, train_bank
from trainers.checkpoint import CheckpointManager, load_checkpoint
from trainers.data import ShowerData, split_validation
from trainers.loop import TrainConfig, _Batches, train
from zoo import create_model
from zoo.fastcalogan import for_region

# three regions of different voxel counts: 368 (photons), 533 (pions), and electrons further out
REGIONS = get_detector("atlas-like").select(["photon_eta_020_025", "pion_eta_020_025", "electron_eta_300_305"])
SEEDS = [11, 12, 13]


@pytest.fixture(scope="module")
def data():
    out = []
    for j, region in enumerate(REGIONS):
        energies = np.repeat([8192.0, 65536.0], 40)
        x = region.simulator().simulate(energies, angle_deg=region.angle_deg, rng=np.random.default_rng(j))
        out.append(split_validation(ShowerData(x, energies, region.readout, region.name), 0.25, 10, seed=0))
    return out


def gans():
    models = []
    for j, region in enumerate(REGIONS):
        torch.manual_seed(100 + j)
        models.append(for_region(region, batch_size=16, n_critic=2, learning_rate=1e-3))
    return models


def vaes():
    models = []
    for j, region in enumerate(REGIONS):
        torch.manual_seed(200 + j)
        models.append(create_model("par04_vae_pbwo4", readout=region.readout.to_dict(), batch_size=16))
    return models


def assert_parameters_agree(a: dict, b: dict, lr: float, steps: int, what: str) -> None:
    """Almost every element within 1e-5, none further apart than two Adam steps (see below)."""
    total = close = 0
    for key, value in a.items():
        if not value.is_floating_point():
            continue
        diff = (b[key] - value).abs()
        assert diff.max() <= 2 * lr * steps, f"{what} {key}"
        total, close = total + diff.numel(), close + int((diff <= 1e-5).sum())
    assert close / total >= 0.999, f"{what}: only {close / total:.4%} of the parameters agree"


def final_state(run_dir):
    mgr = CheckpointManager(run_dir / "checkpoints")
    return load_checkpoint(mgr.latest())


def test_voxel_counts_differ():
    assert len({r.readout.n_voxels for r in REGIONS}) == 3


def plain_vaes():
    """Par04's VAE without its batch norm (see the gradient test for why)."""
    models = []
    for j, region in enumerate(REGIONS):
        torch.manual_seed(200 + j)
        models.append(create_model("par04_vae_pbwo4", readout=region.readout.to_dict(), batch_size=16,
                                   batch_norm=False))
    return models


@pytest.mark.parametrize("build", [gans, plain_vaes], ids=["fastcalogan", "par04_vae"])
def test_bank_equals_models_trained_one_by_one(build, data, tmp_path):
    """Same seeds: after a few iterations the parameters equal those of training one by one. Adam's
    first steps move a parameter by about +-lr whatever the size of its gradient, so an element whose
    gradient is at the level of float rounding may step the other way: almost every element agrees to
    1e-5, and none differs by more than two steps."""
    models = build()
    singles = [copy.deepcopy(m) for m in models]
    trs, vas = [d[0] for d in data], [d[1] for d in data]
    steps = 4
    cfg = dict(iterations=steps, checkpoint_every=2, progress=False, n_val_max=20)
    for j, m in enumerate(singles):
        train(m, trs[j], vas[j], TrainConfig(seed=SEEDS[j], **cfg), tmp_path / f"single{j}")
    train_bank(models, trs, vas, TrainConfig(**cfg), [tmp_path / f"bank{j}" for j in range(3)],
               rng="per_model", seeds=SEEDS)
    lr = models[0].config.learning_rate
    for j in range(3):
        a, b = final_state(tmp_path / f"single{j}"), final_state(tmp_path / f"bank{j}")
        assert a["iteration"] == b["iteration"] == steps
        assert_parameters_agree(a["model"], b["model"], lr, steps, f"region {j}")
        for ha, hb in zip(a["history"], b["history"]):  # the losses and metrics of every checkpoint
            for key in ha:
                assert hb[key] == pytest.approx(ha[key], rel=1e-4, abs=1e-4), f"region {j} {key}"
    # training changed the weights (the comparison above is not between two untouched copies)
    first = build()[0].state_dict()
    assert any(not torch.allclose(first[k], v) for k, v in final_state(tmp_path / "bank0")["model"].items()
               if v.is_floating_point())


def test_batch_norm_vae_bank_gradients_equal_single_models(data):
    """Par04's VAE with batch norm: the bank's per-model gradients equal each single model's (the
    bias ahead of a batch norm has a gradient that cancels to rounding, which Adam would amplify, so
    the gradients, not a few steps' parameters, are compared)."""
    models = vaes()
    singles = [copy.deepcopy(m) for m in models]
    bank = make_bank(models, [d[0] for d in data], rng="per_model", seeds=SEEDS)
    bank.losses(nullcontext)["loss"].sum().backward()
    for j, m in enumerate(singles):
        torch.manual_seed(SEEDS[j])
        batches = _Batches(m, data[j][0], 16, torch.device("cpu"), torch.Generator().manual_seed(SEEDS[j]))
        m.losses(batches())["loss"].backward()
        for name, p in m.named_parameters():
            scale = p.grad.abs().max()
            torch.testing.assert_close(bank.grad_of(j, name), p.grad, rtol=0, atol=1e-5 * float(scale),
                                       msg=f"region {j} {name}")
    # and the running statistics of the batch norms
    for j, m in enumerate(singles):
        for key, value in m.state_dict().items():
            if "running" in key:
                torch.testing.assert_close(bank.model_state(j)[key], value, rtol=1e-5, atol=1e-6)


def test_padding_stays_zero(data):
    models = gans()
    bank = make_bank(models, [d[0] for d in data], rng="bank")
    for _ in range(3):
        bank.step(nullcontext)
    out = bank.generator(bank.randn(8, bank.latent), bank.cond[:8].expand(3, 8, -1))
    for j, n in enumerate(bank.n_vox):
        assert torch.all(out[j, :, n:] == 0)
        # the critic's padded input rows and hidden units never move from zero
        c = bank.n_cond
        assert torch.all(bank.d_layers[0].weight[j, c + n:] == 0)
        assert torch.all(bank.d_layers[0].weight[j, :, n:] == 0) and torch.all(bank.d_layers[0].bias[j, :, n:] == 0)


def test_bank_resumes_exactly(data, tmp_path):
    trs, vas = [d[0] for d in data], [d[1] for d in data]
    cfg = dict(checkpoint_every=2, progress=False, n_val_max=20)
    dirs_a = [tmp_path / f"a{j}" for j in range(3)]
    dirs_b = [tmp_path / f"b{j}" for j in range(3)]
    train_bank(gans(), trs, vas, TrainConfig(iterations=4, **cfg), dirs_a, seeds=SEEDS)
    train_bank(gans(), trs, vas, TrainConfig(iterations=2, **cfg), dirs_b, seeds=SEEDS)  # "killed" at 2
    fresh = gans()
    for m in fresh:  # different weights: resuming must load them
        torch.nn.init.zeros_(m.generator.layers[0].weight)
    train_bank(fresh, trs, vas, TrainConfig(iterations=4, **cfg), dirs_b, seeds=SEEDS)
    for da, db in zip(dirs_a, dirs_b):
        a, b = final_state(da), final_state(db)
        for key, value in a["model"].items():
            torch.testing.assert_close(b["model"][key], value, rtol=0, atol=0)
        assert [h["iteration"] for h in b["history"]] == [2, 4]


def test_bank_resumes_after_a_crash_in_the_middle_of_a_save_round(data, tmp_path):
    """Model 0 checkpointed one round further than the others: they catch up, then all go on, and
    the result equals an uninterrupted bank (each model's random streams are its own)."""
    trs, vas = [d[0] for d in data], [d[1] for d in data]
    cfg = dict(checkpoint_every=2, progress=False, n_val_max=20)
    dirs_a = [tmp_path / f"a{j}" for j in range(3)]
    dirs_b = [tmp_path / f"b{j}" for j in range(3)]
    train_bank(gans(), trs, vas, TrainConfig(iterations=6, **cfg), dirs_a, seeds=SEEDS)
    train_bank(gans(), trs, vas, TrainConfig(iterations=2, **cfg), dirs_b, seeds=SEEDS)
    train_bank(gans()[:1], trs[:1], vas[:1], TrainConfig(iterations=4, **cfg), dirs_b[:1], seeds=SEEDS[:1])
    assert [final_state(d)["iteration"] for d in dirs_b] == [4, 2, 2]
    train_bank(gans(), trs, vas, TrainConfig(iterations=6, **cfg), dirs_b, seeds=SEEDS)
    for da, db in zip(dirs_a, dirs_b):
        a, b = final_state(da), final_state(db)
        assert a["iteration"] == b["iteration"] == 6
        # a bank of one sums in another order than a bank of three: float tolerance, not bits
        assert_parameters_agree(a["model"], b["model"], 1e-3, 6, str(da))
