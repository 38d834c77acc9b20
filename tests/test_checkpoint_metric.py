"""The best-epoch criterion sees the model (issue #14): with par04_vae_pbwo4's response table, E_tot
is drawn from the data's quantiles and its χ² is the same at every checkpoint; the criterion also
judges the layer energies, centres and widths, which come from the network."""

import numpy as np
import pytest
import torch

from showers.readout import get_readout
from trainers.data import ShowerData
from trainers.loop import validate
from validate.metrics import CRITERION, checkpoint_metrics
from zoo import create_model
from zoo.checkpoint import CheckpointManager

READOUT = get_readout("g4-pbwo4")


def _showers(n_per_point: int, seed: int, depth_shift: float = 0.0):
    """A longitudinal gamma profile (shifted deeper by ``depth_shift`` in units of the readout's 10
    'radiation lengths'), an exponential radial one, log-normal voxels, half of them empty; E_tot/E_inc
    0.95 ± 1 % at 2, 16 and 128 GeV."""
    rng = np.random.default_rng(seed)
    energy = np.repeat([2048.0, 16384.0, 131072.0], n_per_point)
    depth = (READOUT.voxel_layer + 0.5) / READOUT.n_layers * 10.0 - depth_shift
    r_mid = READOUT.voxel_centres[0] / READOUT.r_edges_union[-1] * 5.0
    profile = np.clip(depth, 0, None) ** 2 * np.exp(-np.clip(depth, 0, None)) * np.exp(-r_mid)
    f = profile * rng.lognormal(0.0, 1.0, (len(energy), READOUT.n_voxels)) * (rng.random((len(energy), READOUT.n_voxels)) > 0.5)
    f *= (0.95 * (1 + 0.01 * rng.standard_normal(len(energy))) / f.sum(1))[:, None]
    return (f * energy[:, None]).astype(np.float32), energy


def test_criterion_is_zero_for_identical_samples_and_grows_with_the_depth_shift():
    ref, e = _showers(150, seed=0)
    same = checkpoint_metrics(ref, e, ref, e, READOUT)
    assert same[CRITERION] == 0 and same["chi2_sum"] == 0
    assert same["ndf_layers"] > 0 and same["ndf_centre"] > 0 and same["ndf_width"] > 0
    values = []
    for shift in (0.0, 0.3, 1.0):
        gen, ge = _showers(150, seed=1, depth_shift=shift)
        m = checkpoint_metrics(gen, ge, ref, e, READOUT)
        values.append(m[CRITERION])
        # the parts combine as documented: the sum of their χ²/ndf
        assert m[CRITERION] == pytest.approx(m["chi2_ndf"] + sum(m[f"chi2_{p}"] / m[f"ndf_{p}"]
                                                                for p in ("layers", "centre", "width")))
    assert values[0] < 2 * 4  # another sample of the same showers: about 1 per part
    assert values[0] < values[1] < values[2]


def test_the_criterion_s_error_is_its_spread_over_samples_of_the_same_showers():
    """``criterion_error`` (the parts' χ² variances added) against the criterion's spread over
    independent samples of the same showers, and larger for a model the criterion tells apart."""
    ref, e = _showers(150, seed=0)
    runs = [checkpoint_metrics(*_showers(150, seed=s), ref, e, READOUT) for s in range(1, 9)]
    values = np.array([m[CRITERION] for m in runs])
    errors = np.array([m[CRITERION + "_error"] for m in runs])
    assert 0.5 < values.std(ddof=1) / errors.mean() < 2.0, (values.std(ddof=1), errors.mean())
    far = checkpoint_metrics(*_showers(150, seed=1, depth_shift=1.0), ref, e, READOUT)
    assert far[CRITERION + "_error"] > 1.5 * errors.mean()


def test_two_checkpoints_of_a_table_driven_vae_get_different_criteria(tmp_path):
    torch.manual_seed(0)
    model = create_model("par04_vae_pbwo4", encoder_widths=(16, 8), latent_dim=4)
    x, e = _showers(40, seed=2)
    val = ShowerData(x, e, READOUT, "synthetic")
    model.fit_data(e, x)
    model.eval()
    first, _ = validate(model, val)
    with torch.no_grad():  # other weights: the decoder's output layer moved
        model.to_voxels.weight.mul_(3.0)
        model.to_voxels.bias.add_(torch.linspace(-2.0, 2.0, model.n_voxels))
    second, _ = validate(model, val)
    # E_tot comes from the table, the same for both (same noise): its χ² cannot tell them apart ...
    assert first["chi2_sum"] == second["chi2_sum"]
    # ... the criterion does
    assert first[CRITERION] != second[CRITERION]
    assert first["chi2_layers"] != second["chi2_layers"]
    # and the checkpoints are ranked by it
    mgr = CheckpointManager(tmp_path, keep=3)
    mgr.save({"x": torch.tensor(0.0)}, 100, first)
    mgr.save({"x": torch.tensor(1.0)}, 200, second)
    better = 100 if first[CRITERION] < second[CRITERION] else 200
    # (further apart than their statistical error: the smaller is the better, not the later)
    error = max(first[CRITERION + "_error"], second[CRITERION + "_error"])
    assert abs(first[CRITERION] - second[CRITERION]) > 1.5 * error
    assert mgr.best()["iteration"] == better
