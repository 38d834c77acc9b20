"""The single-model trainer: data split, metric, bounded checkpoints, exact resume, both loops."""

import numpy as np
import pytest
import torch

from showers.readout import get_readout
from showers.simulator import ShowerSimulator
from zoo.checkpoint import CheckpointManager, load_checkpoint
from trainers.data import ShowerData, split_validation
from trainers.loop import TrainConfig, incremental_order, train
from validate.metrics import etot_chi2
from zoo import create_model, model_from_checkpoint


@pytest.fixture(scope="module")
def data():
    ro = get_readout("g4-pbwo4")
    energies = np.repeat([4000.0, 16000.0, 64000.0], 120)
    x = ShowerSimulator(ro, "PbWO4", "e-").simulate(energies, seed=3)
    return ShowerData(x, energies, ro, "simulated")


def test_split_is_stratified_and_disjoint(data):
    tr, va = split_validation(data, fraction=0.25, min_per_energy=40, seed=1)
    assert len(tr) + len(va) == len(data)
    for e in (4000.0, 16000.0, 64000.0):
        assert (va.energy == e).sum() == 40
    # no validation shower is in the training set
    rows_tr = {r.tobytes() for r in tr.showers}
    assert not any(r.tobytes() in rows_tr for r in va.showers)


def test_a_small_file_keeps_half_of_each_energy_for_training(data):
    # the default --min-val-per-energy (100) is sized for campaigns; 120 showers per energy keep 60
    tr, va = split_validation(data, fraction=0.2, min_per_energy=100, seed=0)
    for e in (4000.0, 16000.0, 64000.0):
        assert (va.energy == e).sum() == 60 and (tr.energy == e).sum() == 60


def test_incremental_order_follows_fastcalogan():
    pts = [1024.0 * 2**k for k in range(9)]  # 1 ... 256 GeV
    gev = [p / 1024 for p in incremental_order(pts)]
    assert gev == [32, 64, 16, 128, 8, 256, 4, 2, 1]


def test_metric_is_zero_for_identical_samples_and_grows_with_a_shift(data):
    same = etot_chi2(data.showers, data.energy, data.showers, data.energy)
    assert same["chi2_sum"] == 0 and same["sep_power"] == 0
    half = etot_chi2(data.showers[::2], data.energy[::2], data.showers[1::2], data.energy[1::2])
    shifted = etot_chi2(data.showers[::2] * 1.03, data.energy[::2], data.showers[1::2], data.energy[1::2])
    assert shifted["chi2_sum"] > 3 * half["chi2_sum"] and shifted["sep_power"] > half["sep_power"]
    assert len(same["per_energy"]) == 3


def test_checkpoints_stay_bounded(tmp_path):
    mgr = CheckpointManager(tmp_path, keep=5)
    values = [9, 3, 7, 1, 8, 2, 6, 5, 4, 10, 11]
    for i, v in enumerate(values, start=1):
        mgr.save({"x": torch.tensor(float(v))}, i * 100, {"criterion": float(v)})
        assert len(list(tmp_path.glob("*.pt"))) <= 5
    kept = sorted(int(p.stem.split("-")[1]) for p in tmp_path.glob("*.pt"))
    # the best four (1, 2, 3, 4 at iterations 400, 600, 200, 900) and the latest (1100)
    assert kept == [200, 400, 600, 900, 1100]
    assert mgr.best()["iteration"] == 400
    # the index survives a restart
    assert CheckpointManager(tmp_path, keep=5).best()["iteration"] == 400


def test_a_tie_goes_to_the_later_checkpoint(tmp_path):
    """Equal metrics (a model whose E_tot comes from a fixed table has the same χ² at every
    checkpoint): the later one, trained longer, is the best."""
    mgr = CheckpointManager(tmp_path, keep=3)
    for it, v in ((100, 2.0), (200, 1.0), (300, 1.0), (400, 3.0)):
        mgr.save({"x": torch.tensor(0.0)}, it, {"criterion": v})
    assert mgr.best()["iteration"] == 300


def test_the_best_is_the_latest_that_the_metric_s_error_cannot_tell_from_the_smallest(tmp_path):
    """Once a model is as good as the validation set can tell, the smallest value is the luckiest draw:
    a later checkpoint within √2 × its error (the error of a difference) is taken, one beyond it not."""
    mgr = CheckpointManager(tmp_path, keep=4)
    for it, v in ((100, 4.5), (200, 4.75), (300, 4.62), (400, 4.66)):
        mgr.save({"x": torch.tensor(0.0)}, it, {"criterion": v, "criterion_error": 0.12})
    assert mgr.best()["iteration"] == 400  # 4.66 - 4.5 < 0.17; 4.75 at 200 is beyond
    mgr.save({"x": torch.tensor(0.0)}, 500, {"criterion": 4.7, "criterion_error": 0.12})
    assert mgr.best()["iteration"] == 400
    # without an error (another metric, an older index) only a tie goes to the later one
    plain = CheckpointManager(tmp_path / "plain", keep=4)
    for it, v in ((100, 4.5), (200, 4.6)):
        plain.save({"x": torch.tensor(0.0)}, it, {"criterion": v})
    assert plain.best()["iteration"] == 100


def _vae():
    torch.manual_seed(0)
    return create_model("par04_vae_pbwo4", batch_size=32)


def test_killed_training_resumes_exactly(data, tmp_path):
    tr, va = split_validation(data, 0.25, seed=0)
    full = train(_vae(), tr, va, TrainConfig(iterations=40, checkpoint_every=10, progress=False), tmp_path / "full")
    # the same run, "killed" after its checkpoint at 20, then started again in a fresh model
    train(_vae(), tr, va, TrainConfig(iterations=20, checkpoint_every=10, progress=False), tmp_path / "cut")
    model = create_model("par04_vae_pbwo4", batch_size=32)  # different initial weights: resume must load
    resumed = train(model, tr, va, TrainConfig(iterations=40, checkpoint_every=10, progress=False), tmp_path / "cut")
    assert [h["iteration"] for h in resumed.history] == [10, 20, 30, 40]
    for a, b in zip(full.history, resumed.history):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)
        assert a["chi2_sum"] == pytest.approx(b["chi2_sum"], rel=1e-5, abs=1e-6)
    # any checkpoint rebuilds its model alone
    state = load_checkpoint(resumed.checkpoints[-1])
    rebuilt = model_from_checkpoint(state)
    for (k, v), w in zip(rebuilt.state_dict().items(), model.state_dict().values()):
        assert torch.allclose(v, w.cpu()), k
    assert len(resumed.checkpoints) <= 5


def test_adversarial_loop_with_incremental_schedule(data, tmp_path):
    tr, va = split_validation(data, 0.25, seed=0)
    torch.manual_seed(0)
    gan = create_model("fastcalogan_pbwo4", batch_size=32, critic_widths=(64, 32, 16), generator_widths=(32, 64, 64))
    res = train(gan, tr, va, TrainConfig(iterations=12, checkpoint_every=6, incremental_every=4, progress=False),
                tmp_path)
    assert [h["iteration"] for h in res.history] == [6, 12]
    assert all(np.isfinite(h["chi2_sum"]) for h in res.history)
    assert "critic_loss" in res.history[-1] and "generator_loss" in res.history[-1]


def test_wrong_readout_is_refused(data, tmp_path):
    model = create_model("fastcalogan")  # 368 voxels
    with pytest.raises(ValueError, match="6480 voxels"):
        train(model, data, data, TrainConfig(iterations=1, progress=False), tmp_path)
