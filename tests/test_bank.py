"""Banks: K models trained in lockstep (the family's own module stacked under vmap) equal the same
models trained one by one with the same seeds, for every registered variant; a bank of one is its
model trained by hand, bit for bit, in the checkpoint layout of a bank's model; banks resume exactly;
models of different shapes are grouped into banks of their own."""

import contextlib
import copy

import numpy as np
import pytest
import torch

from showers.detector import get_detector
from showers.readout import Readout
from trainers.bank import Bank, bank_groups, bank_key
from trainers.data import ShowerData, split_validation
from trainers.loop import TrainConfig, train, train_models
from zoo import create_model, list_models
from zoo.checkpoint import CheckpointManager, load_checkpoint
from zoo.fastcalogan import for_region

SEEDS = [11, 12, 13]
LOSSES = {"loss", "reconstruction", "kl", "nll_zero", "nll_energy"}

# Par04's 18 x 50 x 45 grid (40500 voxels, 8 M weights a model) shrunk to a grid of the same kind: the
# bank's machinery does not depend on the voxel count, and three models of 8 M weights, their Adam states
# and checkpoints are minutes of work on 2 cores
PAR04_SMALL = Readout.regular("bank-par04", 5, 10, [0.0, 5.0, 10.0, 20.0, 40.0, 80.0], 3.5).to_dict()  # 250 voxels

# small enough for a 2-core CPU, the same architecture otherwise (flow matching's calibration samples
# 64 showers per energy knot at every checkpoint: two knots for the synthetic data's two energies)
SMALL = {
    "par04_vae": dict(batch_size=8, readout=PAR04_SMALL),
    "par04_vae_ds2": dict(batch_size=8),
    "par04_vae_pbwo4": dict(batch_size=8),
    "par04_vae_region": dict(batch_size=8),
    "fastcalogan": dict(batch_size=8, n_critic=2, learning_rate=1e-3),
    "fastcalogan_pion": dict(batch_size=8, n_critic=2, learning_rate=1e-3),
    "fastcalogan_pbwo4": dict(batch_size=8, n_critic=2, learning_rate=1e-3, critic_widths=(64, 32)),
    "fast_ar": dict(batch_size=4, width=8, n_conv=1, n_components=2),
    "fast_ar_24": dict(batch_size=4, width=8, n_conv=1, n_components=2),
    "flow_matching": dict(batch_size=8, shape_widths=(32, 32), energy_widths=(16, 16), energy_knots=2),
    "flow_matching_pbwo4": dict(batch_size=8, shape_widths=(32, 32), energy_widths=(16, 16), energy_knots=2),
}


def test_every_variant_has_a_small_config():
    assert set(SMALL) == set(list_models())


def synthetic(model, n: int, seed: int) -> ShowerData:
    """Sparse showers of about 0.9 E_inc at two energies, with the conditions the model takes."""
    rng = np.random.default_rng(seed)
    energy = np.repeat([4096.0, 32768.0], n // 2)
    x = rng.exponential(1.0, (len(energy), model.n_voxels)) * (rng.random((len(energy), model.n_voxels)) < 0.3)
    x *= (0.9 * energy / np.maximum(x.sum(1), 1e-9))[:, None]
    spec = model.condition_spec
    angle = np.full(len(energy), 70.0) if spec.use_angle else None
    geometry = np.array([spec.geometries[j % len(spec.geometries)] for j in range(len(energy))]) \
        if spec.geometries else None
    return ShowerData(x.astype(np.float32), energy, model.readout, f"synthetic{seed}", angle=angle, geometry=geometry)


def build(name: str, **extra):
    models = []
    for j in range(3):
        torch.manual_seed(100 + j)
        models.append(create_model(name, **SMALL[name], **extra))
    return models


def final_state(run_dir):
    return load_checkpoint(CheckpointManager(run_dir / "checkpoints").latest())


def assert_parameters_agree(a: dict, b: dict, lr: float, steps: int, what: str) -> None:
    """Almost every element within 1e-5, none further apart than two Adam steps: Adam's first steps
    move an element by about ±lr whatever the size of its gradient, so an element whose gradient is
    at the level of float rounding (a bias just ahead of a batch norm) may step the other way. Tables a
    model fits to its own showers at each checkpoint (flow matching's calibration, ``calib.*``) are
    quantiles of generated energies: the weights' rounding moves them by about 1e-4 MeV, so they are
    compared to 1e-3, relative and absolute."""
    total = close = 0
    for key, value in a.items():
        if key.startswith("calib.") and value.is_floating_point():
            torch.testing.assert_close(b[key], value, rtol=1e-3, atol=1e-3, msg=f"{what} {key}")
            continue
        if not value.is_floating_point():
            assert torch.equal(b[key], value), f"{what} {key}"
            continue
        diff = (b[key] - value).abs()
        assert diff.max() <= 2 * lr * steps + 1e-6, f"{what} {key}: {float(diff.max())}"
        total, close = total + diff.numel(), close + int((diff <= 1e-5).sum())
    assert close / total >= 0.999, f"{what}: only {close / total:.4%} of the parameters agree"


def _step_names(model) -> list[tuple[str, str]]:
    if model.kind == "adversarial":
        return [("critic", "critic_loss"), ("generator", "generator_loss")]
    return [("loss", "losses")]


@pytest.mark.parametrize("name", list_models())
def test_bank_gradients_equal_single_models(name):
    """The first gradients of a bank of three equal those of three banks of one (the same batches and
    noise), every variant with its own config, batch norm included."""
    models = build(name)
    singles = [copy.deepcopy(m) for m in models]
    data = [synthetic(m, 24, j) for j, m in enumerate(models)]
    bank = Bank(models, data, seeds=SEEDS)
    alone = [Bank([m], [d], seeds=[s]) for m, d, s in zip(singles, data, SEEDS)]
    for step, method in _step_names(models[0]):
        batch = bank.batch(step)
        bank.evaluate(method, batch)["loss"].sum().backward()
        for j, b1 in enumerate(alone):
            own = b1.batch(step)
            assert all(torch.equal(own[key][0], batch[key][j]) for key in batch)
            b1.evaluate(method, own)["loss"].sum().backward()
            single = b1.models[0]
            # a bias ahead of a batch norm has a gradient that cancels to rounding, and so has a first
            # layer's weight on a constant condition (Par04's angle and geometry columns: biases too);
            # the bank's batched products and a single model's plain ones round differently, and that
            # noise is measured against the model's largest gradient, everything else against its own
            largest = max(float(p.grad[j].abs().max()) for p in bank.params.values() if p.grad is not None)
            for n, p in bank.params.items():
                if p.grad is None:
                    assert single.get_parameter(n).grad is None
                    continue
                atol = 1e-4 * float(p.grad[j].abs().max()) + 5e-4 * largest
                torch.testing.assert_close(single.get_parameter(n).grad, p.grad[j], rtol=0, atol=atol,
                                           msg=lambda m: f"{name} {method} model {j} {n}: {m}")
        for b in [bank, *alone]:
            for p in b.params.values():
                p.grad = None


def by_hand(model, data: ShowerData, seed: int, steps: int) -> None:
    """``steps`` iterations of a loop written by hand: the model's own methods, ``torch.optim.Adam``
    over its own parameters, batches and noise drawn from two generators seeded ``seed`` as a bank's
    model draws them."""
    cfg, b = model.config, model.config.batch_size
    showers = torch.as_tensor(data.showers)
    energy = torch.as_tensor(data.energy, dtype=torch.float32)
    geometry = None if data.geometry is None else list(data.geometry)
    conditions = model.encode_conditions(data.energy, data.angle, geometry, ignore_unused=True)
    rows, noise = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)

    def descend(opt, step, method):
        idx = torch.randint(len(energy), (b,), generator=rows)
        batch = {"showers": showers[idx], "energy": energy[idx], "conditions": conditions[idx],
                 **model.draw_training_noise(step, b, noise)}
        loss = getattr(model, method)(batch)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    model.train()
    if model.kind == "adversarial":
        opt_c = torch.optim.Adam(model.critic_parameters(), lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2))
        opt_g = torch.optim.Adam(model.generator_parameters(), lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2))
        for _ in range(steps):
            for _ in range(cfg.n_critic):
                descend(opt_c, "critic", "critic_loss")
            descend(opt_g, "generator", "generator_loss")
    else:
        opt = torch.optim.Adam(model.parameters(), lr=cfg.learning_rate)
        for _ in range(steps):
            descend(opt, "loss", "losses")


def layout(x):
    """The structure of a checkpoint part: its keys, and each tensor's shape and dtype."""
    if isinstance(x, dict):
        return {k: layout(v) for k, v in x.items()}
    return (tuple(x.shape), x.dtype) if torch.is_tensor(x) else x


@pytest.mark.parametrize("name", list_models())
def test_a_bank_of_one_is_its_model_trained_by_hand(name):
    """A bank of one calls its module directly (no vmap): bit for bit the hand-written loop; a bank of
    two's model 0 agrees with it as banks and single trainings agree; its checkpoint parts have the
    layout of a bank's model, and it resumes from them bit for bit."""
    extra = {"batch_norm": False} if name.startswith("par04") else {}  # as in the trajectories above
    models = build(name, **extra)
    data = [synthetic(m, 24, j) for j, m in enumerate(models[:2])]
    hand = copy.deepcopy(models[0])
    by_hand(hand, data[0], SEEDS[0], 3)
    one, two = Bank([models[0]], data[:1], seeds=SEEDS[:1]), Bank(models[1:], data, seeds=SEEDS[:2])
    two.load_model_state(0, one.model_state(0))  # model 0 of both banks starts from the same weights
    for _ in range(3):
        for bank in (one, two):
            bank.step(contextlib.nullcontext)
    state = one.model_state(0)
    for key, value in hand.state_dict().items():
        assert torch.equal(state[key], value), f"{name} {key}"
    assert_parameters_agree(state, two.model_state(0), models[0].config.learning_rate, 3, f"{name} bank of two")
    assert layout(state) == layout(two.model_state(0))
    assert layout(one.optimiser_state(0)) == layout(two.optimiser_state(0))
    assert layout(one.rng_state(0)) == layout(two.rng_state(0))
    # resumed from its checkpoint parts into fresh weights, one more step equals the uninterrupted bank's
    saved = {"model": state, "optimiser": one.optimiser_state(0), "rng": one.rng_state(0)}
    resumed = Bank([build(name, **extra)[2]], data[:1], seeds=[0])
    resumed.load([saved])
    for bank in (one, resumed):
        bank.step(contextlib.nullcontext)
    for key, value in one.model_state(0).items():
        assert torch.equal(resumed.model_state(0)[key], value), f"{name} resumed {key}"


@pytest.mark.parametrize("name", list_models())
def test_bank_of_three_equals_three_trainings(name, tmp_path):
    # Par04's batch norm divides by a batch's spread: the gradient of a bias just ahead of it cancels
    # to float rounding, which Adam turns into ±lr steps, and those move every later layer. The
    # gradients are compared with batch norm above; the trajectories, without it.
    extra = {"batch_norm": False} if "batch_norm" in SMALL[name] or name.startswith("par04") else {}
    models = build(name, **extra)
    singles = [copy.deepcopy(m) for m in models]
    data = [split_validation(synthetic(m, 32, j), 0.25, seed=0) for j, m in enumerate(models)]
    trs, vas = [d[0] for d in data], [d[1] for d in data]
    steps = 4
    cfg = dict(iterations=steps, checkpoint_every=2, progress=False, n_val_max=8)
    for j, m in enumerate(singles):
        train(m, trs[j], vas[j], TrainConfig(seed=SEEDS[j], **cfg), tmp_path / f"single{j}")
    results = train_models(models, trs, vas, TrainConfig(**cfg), [tmp_path / f"bank{j}" for j in range(3)],
                           rng="per_model", seeds=SEEDS)
    assert [r.iteration for r in results] == [steps] * 3
    lr = models[0].config.learning_rate
    for j in range(3):
        a, b = final_state(tmp_path / f"single{j}"), final_state(tmp_path / f"bank{j}")
        assert a["iteration"] == b["iteration"] == steps
        assert_parameters_agree(a["model"], b["model"], lr, steps, f"{name} model {j}")
        for ha, hb in zip(a["history"], b["history"]):  # the losses of every checkpoint
            # (not the validation metrics: histogram χ² jump when a value crosses a bin edge)
            for key in [k for k in ha if k in LOSSES or k.startswith(("critic_", "generator_"))]:
                assert hb[key] == pytest.approx(ha[key], rel=1e-3, abs=1e-3), f"{name} model {j} {key}"
        # the models passed in hold the final weights
        for key, value in models[j].state_dict().items():
            torch.testing.assert_close(value.cpu(), b["model"][key], rtol=0, atol=0)
    # training changed the weights (the comparison is not between two untouched copies)
    first = build(name, **extra)[0].state_dict()
    assert any(not torch.equal(first[k], v) for k, v in final_state(tmp_path / "bank0")["model"].items()
               if v.is_floating_point())


class _Killed(Exception):
    pass


def _kill_at(iteration: int, last: int = 2):
    """A ``log`` that stops training once model ``last`` has saved ``iteration``."""
    def log(i, record, done):
        if done == iteration and i == last:
            raise _Killed
    return log


def test_learning_rate_schedules():
    fm, vae = (Bank([m], [synthetic(m, 8, 0)]) for m in (create_model(name, **SMALL[name])
                                                         for name in ("flow_matching", "par04_vae")))
    base = fm.models[0].config.learning_rate
    assert fm.models[0].config.lr_schedule == "cosine" and not hasattr(vae.models[0].config, "lr_schedule")
    for progress, factor in ((0.0, 1.0), (0.25, 0.5 + 0.5 * np.cos(np.pi / 4)), (0.5, 0.5), (1.0, 0.0)):
        fm.anneal(progress)
        vae.anneal(progress)
        assert [g["lr"] for g in fm.step_fn.opt.opt.param_groups] == [pytest.approx(base * factor, abs=1e-12)]
        assert [g["lr"] for g in vae.step_fn.opt.opt.param_groups] == [vae.models[0].config.learning_rate]
    with pytest.raises(ValueError, match="lr_schedule must be one of"):
        create_model("flow_matching", lr_schedule="linear")


@pytest.mark.parametrize("name", list_models())
def test_bank_of_three_resumes_exactly(name, tmp_path):
    models = build(name)
    data = [split_validation(synthetic(m, 32, j), 0.25, seed=0) for j, m in enumerate(models)]
    trs, vas = [d[0] for d in data], [d[1] for d in data]
    cfg = dict(checkpoint_every=2, progress=False, n_val_max=8)
    dirs_a = [tmp_path / f"a{j}" for j in range(3)]
    dirs_b = [tmp_path / f"b{j}" for j in range(3)]
    train_models(build(name), trs, vas, TrainConfig(iterations=4, **cfg), dirs_a, seeds=SEEDS)
    with pytest.raises(_Killed):  # killed after the save round of iteration 2 (same config: lr schedules)
        train_models(build(name), trs, vas, TrainConfig(iterations=4, **cfg), dirs_b, seeds=SEEDS, log=_kill_at(2))
    fresh = build(name)
    for m in fresh:  # other weights: resuming must load them
        for p in m.parameters():
            torch.nn.init.zeros_(p)
    train_models(fresh, trs, vas, TrainConfig(iterations=4, **cfg), dirs_b, seeds=SEEDS)
    for da, db in zip(dirs_a, dirs_b):
        a, b = final_state(da), final_state(db)
        for key, value in a["model"].items():
            torch.testing.assert_close(b["model"][key], value, rtol=0, atol=0, msg=f"{name} {key}")
        assert [h["iteration"] for h in b["history"]] == [2, 4]
        assert [h["loss" if "loss" in h else "critic_loss"] for h in b["history"]] == \
            [h["loss" if "loss" in h else "critic_loss"] for h in a["history"]]


# three atlas-like regions of three voxel counts, and a second region of the first one's count
REGIONS = [get_detector("atlas-like").region(n) for n in
           ("photon_eta_020_025", "pion_eta_020_025", "photon_eta_025_030", "electron_eta_300_305")]


@pytest.fixture(scope="module")
def region_data():
    out = []
    for j, region in enumerate(REGIONS):
        energies = np.repeat([8192.0, 65536.0], 30)
        x = region.simulator().simulate(energies, angle_deg=region.angle_deg, rng=np.random.default_rng(j))
        out.append(split_validation(ShowerData(x, energies, region.readout, region.name), 0.25, 10, seed=0))
    return out


def gans():
    models = []
    for j, region in enumerate(REGIONS):
        torch.manual_seed(100 + j)
        models.append(for_region(region, batch_size=16, n_critic=2, learning_rate=1e-3))
    return models


def test_regions_are_banked_by_shape():
    models = gans()
    counts = [m.n_voxels for m in models]
    assert counts[0] == counts[2] and len(set(counts)) == 3
    assert bank_groups(models) == [[0, 2], [1], [3]]
    assert bank_key(models[0]) != bank_key(create_model("fastcalogan", readout=REGIONS[0].readout.to_dict(),
                                                        learning_rate=2e-4))
    with pytest.raises(ValueError, match="share family"):
        Bank(models[:2], [None, None])


def test_mixed_regions_train_in_banks_and_equal_single_trainings(region_data, tmp_path):
    trs, vas = [d[0] for d in region_data], [d[1] for d in region_data]
    cfg = dict(iterations=4, checkpoint_every=2, progress=False, n_val_max=20)
    singles = gans()
    for j, m in enumerate(singles):
        train(m, trs[j], vas[j], TrainConfig(seed=SEEDS[j % 3], **cfg), tmp_path / f"single{j}")
    logged = []
    train_models(gans(), trs, vas, TrainConfig(**cfg), [tmp_path / f"bank{j}" for j in range(4)],
                 seeds=[SEEDS[j % 3] for j in range(4)], log=lambda i, record, it: logged.append((i, it)))
    assert sorted(logged) == [(i, it) for i in range(4) for it in (2, 4)]
    for j in range(4):
        a, b = final_state(tmp_path / f"single{j}"), final_state(tmp_path / f"bank{j}")
        assert_parameters_agree(a["model"], b["model"], 1e-3, 4, f"region {j}")


def test_bank_resumes_after_a_crash_in_the_middle_of_a_save_round(region_data, tmp_path):
    """Model 0 checkpointed one round further than the others: they catch up, then all go on, and
    the result equals an uninterrupted bank (each model's random streams are its own)."""
    data = [region_data[0], region_data[2]]
    trs, vas = [d[0] for d in data], [d[1] for d in data]
    models = lambda: [gans()[0], gans()[2]]  # noqa: E731 (same voxel count: one bank)
    cfg = dict(checkpoint_every=2, progress=False, n_val_max=20)
    dirs_a = [tmp_path / f"a{j}" for j in range(2)]
    dirs_b = [tmp_path / f"b{j}" for j in range(2)]
    train_models(models(), trs, vas, TrainConfig(iterations=6, **cfg), dirs_a, seeds=SEEDS[:2])
    train_models(models(), trs, vas, TrainConfig(iterations=2, **cfg), dirs_b, seeds=SEEDS[:2])
    train_models(models()[:1], trs[:1], vas[:1], TrainConfig(iterations=4, **cfg), dirs_b[:1], seeds=SEEDS[:1])
    assert [final_state(d)["iteration"] for d in dirs_b] == [4, 2]
    train_models(models(), trs, vas, TrainConfig(iterations=6, **cfg), dirs_b, seeds=SEEDS[:2])
    for da, db in zip(dirs_a, dirs_b):
        a, b = final_state(da), final_state(db)
        assert a["iteration"] == b["iteration"] == 6
        # a bank of one sums in another order than a bank of two: float tolerance, not bits
        assert_parameters_agree(a["model"], b["model"], 1e-3, 6, str(da))


def test_bank_rng_trains_every_model_on_its_own_data(region_data):
    """rng="bank" (one generator on the device) still gives each model rows of its own data only."""
    data = [region_data[0], region_data[2]]
    bank = Bank([gans()[0], gans()[2]], [d[0] for d in data], rng="bank")
    batch = bank.batch("critic")
    assert batch["showers"].shape == (2, 16, REGIONS[0].readout.n_voxels)
    for i, d in enumerate(data):
        own = {r.astype(np.float32).tobytes() for r in d[0].showers}
        assert all(r.numpy().tobytes() in own for r in batch["showers"][i])
    assert batch["latent"].shape == (2, 16, 50) and batch["gp_mix"].shape == (2, 16)
    before = {k: v.clone() for k, v in bank.params.items()}
    losses = bank.step(lambda: torch.autocast("cpu", enabled=False))
    assert set(losses) >= {"critic_loss", "generator_loss"} and losses["critic_loss"].shape == (2,)
    # every tensor moved but the critic's output bias, which cancels in E[D(fake)] - E[D(real)]
    assert [k for k, v in bank.params.items() if torch.equal(before[k], v)] == ["critic.layers.3.bias"]
