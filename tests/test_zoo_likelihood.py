"""The likelihood-trained zoo families: the Par04 VAE (zoo.par04_vae) and the autoregressive FAST.AR-style
model (zoo.fast_ar). Training sanity, determinism of the inference graph, the VAE loss against a hand
computation, the AR model's causality (in training and in sampling) and its sampler against its own
distribution. ONNX export is covered by the shared smoke test over every registered model."""

import json
import math

import numpy as np
import pytest
import torch

from showers.readout import Readout
from zoo import _registry
from zoo.fast_ar import FastAR, fast_ar, fast_ar_24
from zoo.par04_vae import Par04VAE, par04_vae, par04_vae_ds2, par04_vae_pbwo4

TINY_READOUT = Readout.regular("tiny", 2, 2, [0.0, 1.0, 2.0]).to_dict()  # 2 layers × 2 alpha × 2 r

# Small widths where the variant's own would only slow the tests down; the readouts stay the variants'.
VARIANTS = {
    "par04_vae": (par04_vae, {}),
    "par04_vae_ds2": (par04_vae_ds2, {}),
    "par04_vae_pbwo4": (par04_vae_pbwo4, {}),
    "fast_ar": (fast_ar, dict(width=8, n_conv=2, n_components=3, cond_hidden=16)),
    "fast_ar_24": (fast_ar_24, dict(width=8, n_conv=2, n_components=3, cond_hidden=16)),
}


def synthetic_batch(model, n: int, seed: int = 0) -> dict:
    """Shower-like batch for the model's readout: a longitudinal gamma profile, an exponential radial
    profile, log-normal fluctuations and about half the voxels exactly zero; energies 1–100 GeV."""
    rng = np.random.default_rng(seed)
    ro = model.readout
    depth = (ro.voxel_layer + 0.5) / ro.n_layers * 10.0
    r_mid = ro.voxel_centres[0] / max(ro.r_edges_union[-1], 1e-9) * 5.0
    profile = depth**2 * np.exp(-depth) * np.exp(-r_mid)
    frac = profile * rng.lognormal(0.0, 1.0, size=(n, ro.n_voxels))
    frac *= rng.random((n, ro.n_voxels)) > 0.5
    frac *= 0.95 / frac.sum(1, keepdims=True)
    energy = 10 ** rng.uniform(3.0, 5.0, size=n)
    spec = model.condition_spec
    angle = rng.uniform(50, 90, size=n) if spec.use_angle else None
    geometry = [spec.geometries[i % len(spec.geometries)] for i in range(n)] if spec.geometries else None
    return {
        "showers": torch.as_tensor(frac * energy[:, None], dtype=torch.float32),
        "energy": torch.as_tensor(energy, dtype=torch.float32),
        "conditions": model.encode_conditions(energy, angle, geometry),
        **model.draw_training_noise("loss", n, torch.Generator().manual_seed(seed)),
    }


# -- both families ------------------------------------------------------------------------------------
def test_variants_are_registered():
    for name, (fn, _) in VARIANTS.items():
        assert _registry._ENTRYPOINTS[name] is fn


def test_unknown_override_is_refused():
    with pytest.raises(TypeError, match="unknown config fields"):
        par04_vae_pbwo4(latent_size=3)
    with pytest.raises(TypeError, match="unknown config fields"):
        fast_ar(widht=3)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_training_steps_lower_the_loss(name):
    fn, overrides = VARIANTS[name]
    torch.manual_seed(0)
    model = fn(**overrides)
    assert model.kind == "likelihood"
    batch = synthetic_batch(model, 6)
    opt = torch.optim.Adam(model.parameters(), lr=model.config.learning_rate * 3)
    model.train()
    history = []
    for step in range(30):
        out = model.losses(batch)
        assert set(out) >= {"loss"} and all(torch.isfinite(v) for v in out.values())
        opt.zero_grad()
        out["loss"].backward()
        for p in model.parameters():
            assert p.grad is None or torch.isfinite(p.grad).all()
        opt.step()
        history.append(out["loss"].item())
    # the VAE's loss is noisy (a fresh z each step): compare averages
    assert np.mean(history[-5:]) < 0.9 * np.mean(history[:3]), history


@pytest.mark.parametrize("name", list(VARIANTS))
def test_generate_is_deterministic_and_non_negative(name):
    fn, overrides = VARIANTS[name]
    torch.manual_seed(1)
    model = fn(**overrides).eval()
    cond = synthetic_batch(model, 3)["conditions"]
    noise = torch.randn(3, model.noise_dim, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        a = model.inference_module()(noise, cond)
        b = model.generate(noise.clone(), cond.clone())
    assert a.shape == (3, model.n_voxels) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert torch.isfinite(a).all() and (a >= 0).all() and (a > 0).any()
    other = model.generate(torch.randn(3, model.noise_dim, generator=torch.Generator().manual_seed(6)), cond)
    assert not torch.equal(a, other)


@pytest.mark.parametrize("fn, overrides", [(par04_vae_pbwo4, dict(encoder_widths=(8, 4))),
                                           (fast_ar, dict(width=4, n_conv=1))])
def test_config_round_trips_through_json(fn, overrides):
    model = fn(**overrides).eval()
    d = json.loads(json.dumps(model.describe()))
    rebuilt = type(model)(type(model).config_class(**d["config"]), variant=d["variant"])
    assert rebuilt.config == model.config
    rebuilt.load_state_dict(model.state_dict())
    rebuilt.eval()
    noise, cond = torch.randn(2, model.noise_dim), synthetic_batch(model, 2)["conditions"]
    assert torch.equal(model.generate(noise, cond), rebuilt.generate(noise, cond))


# -- the Par04 VAE --------------------------------------------------------------------------------------
def test_vae_shapes_and_defaults():
    model = par04_vae()
    assert isinstance(model, Par04VAE) and model.family == "par04_vae"
    assert model.n_voxels == 40500 and model.n_cond == 4  # E, angle, SiW, SciPb
    assert model.noise_dim == model.config.latent_dim == 10
    assert model.config.encoder_widths == (100, 50, 20, 14)
    assert [m.out_features for m in model.encoder if isinstance(m, torch.nn.Linear)] == [100, 50, 20, 14]
    assert [m.out_features for m in model.decoder if isinstance(m, torch.nn.Linear)] == [14, 20, 50, 100]
    assert par04_vae_ds2().n_voxels == 6480 and par04_vae_ds2().n_cond == 1
    assert par04_vae_pbwo4().readout.name == "g4-pbwo4"
    # the incident energy comes back from the conditions: E / 1024 GeV, linear
    cond = model.encode_conditions(np.array([1e3, 5e5]), np.array([90.0, 60.0]), "SiW")
    assert torch.allclose(cond, torch.tensor([[1e3 / 1.024e6, 1.0, 1.0, 0.0], [5e5 / 1.024e6, 60 / 90, 1.0, 0.0]]))
    assert torch.allclose(model.energy_from_conditions(cond), torch.tensor([1e3, 5e5]))


def test_vae_loss_is_summed_bce_plus_weighted_kl():
    model = par04_vae_pbwo4(readout=TINY_READOUT, encoder_widths=(6, 4), latent_dim=3, kl_weight=0.7).eval()
    batch = synthetic_batch(model, 5)
    out = model.losses(batch)

    x = batch["showers"] / batch["energy"][:, None]
    mu, logvar = model.encode(x, batch["conditions"])
    z = mu + torch.exp(0.5 * logvar) * batch["latent"]  # the batch's reparameterisation noise
    p = torch.sigmoid(model.decode_logits(z, batch["conditions"])).double()
    x = x.double()
    bce = -(x * p.log() + (1 - x) * (1 - p).log())  # (5, 8)
    reco = bce.mean(1) * 8  # Keras' mean BCE × ORIGINAL_DIM
    mu, logvar = mu.double(), logvar.double()
    kl = 0.5 * (mu**2 + logvar.exp() - 1 - logvar).sum(1)
    assert out["reconstruction"].item() == pytest.approx(reco.mean().item(), rel=1e-5)
    assert out["kl"].item() == pytest.approx(kl.mean().item(), rel=1e-5)
    assert out["loss"].item() == pytest.approx((reco + 0.7 * kl).mean().item(), rel=1e-5)


def test_vae_generate_is_the_decoder_times_the_incident_energy():
    model = par04_vae_pbwo4(readout=TINY_READOUT, encoder_widths=(6, 4), latent_dim=3, spot_energy_mev=0.0,
                            response_quantiles=0).eval()
    energy = np.array([2e3, 64e3])
    cond = model.encode_conditions(energy)
    z = torch.randn(2, 3)
    expected = torch.sigmoid(model.decode_logits(z, cond)) * torch.tensor(energy, dtype=torch.float32)[:, None]
    torch.testing.assert_close(model.generate(z, cond), expected)


def test_vae_voxel_fluctuations_keep_the_mean_and_give_the_compound_poisson_occupancy():
    """With spot_energy_mev = ε, one decoded shower (fixed z) drawn many times: each voxel is empty with
    probability exp(-μ/ε), its mean over the draws is the decoder's μ, the total is the decoder's, and
    no voxel exceeds E_inc."""
    torch.manual_seed(0)
    model = par04_vae_pbwo4(readout=TINY_READOUT, encoder_widths=(6, 4), latent_dim=3, spot_energy_mev=2.0,
                            response_quantiles=0).eval()
    assert model.noise_dim == 3 + 2 * 8
    n = 40000
    cond = model.encode_conditions(np.full(n, 20e3))
    noise = torch.randn(n, model.noise_dim, generator=torch.Generator().manual_seed(1))
    noise[:, :3] = noise[0, :3]  # one latent point
    with torch.no_grad():
        x = model.generate(noise, cond).double()
        mu = (torch.sigmoid(model.decode_logits(noise[:1, :3], cond[:1])) * 20e3).double()[0]
    assert float(x.max()) <= 20e3 and float(x.min()) >= 0.0
    p_hit = 1 - torch.exp(-mu / 2.0)
    occupancy = (x > 0).double().mean(0)
    assert torch.all((occupancy - p_hit).abs() <= 4 * torch.sqrt(p_hit * (1 - p_hit) / n) + 1e-3)
    # the shower keeps the decoder's total; each voxel's mean stays μ (the compound's standard
    # deviation is ε sqrt(2 μ/ε); a little more for the rescaling to the total)
    torch.testing.assert_close(x.sum(1), mu.sum().expand(n), rtol=1e-5, atol=0.0)
    se = torch.sqrt(2 * mu * 2.0 / n)
    assert torch.all((x.mean(0) - mu).abs() <= 5 * se + 1e-3 * mu), (x.mean(0), mu)
    # and the fluctuations are not the mean alone: a busy voxel varies
    assert float(x.std(0).max()) > 0.01 * float(mu.max())


def test_vae_response_table_reproduces_the_training_totals_and_exports(tmp_path):
    """With response_quantiles, fit_data keeps the quantile function of E_grid/E_inc per energy point:
    showers generated at a training energy have its distribution of totals (two-sample KS), an
    energy between two training points gets the interpolation of theirs, and ONNX Runtime agrees."""
    from scipy.stats import ks_2samp

    from zoo.export import export_onnx, onnx_parity

    torch.manual_seed(0)
    model = par04_vae_pbwo4(readout=TINY_READOUT, encoder_widths=(6, 4), latent_dim=3, response_quantiles=51).eval()
    rng = np.random.default_rng(3)
    energy = np.repeat([4e3, 16e3], 400)
    response = np.where(energy == 4e3, rng.normal(0.90, 0.01, 800), 0.95 + rng.exponential(0.02, 800))
    showers = rng.dirichlet(np.ones(8), 800) * (response * energy)[:, None]
    with torch.no_grad():
        before = model.sample(np.full(5, 4e3), generator=torch.Generator().manual_seed(0))
        model.fit_data(energy, showers)
        x = {e: model.sample(np.full(4000, e), generator=torch.Generator().manual_seed(1)).double().sum(1).numpy() / e
             for e in (4e3, 8e3, 16e3)}
    assert model.noise_dim == 3 + 1 + 2 * 8
    assert before.shape == (5, 8)  # unfitted: the decoder's own total, no error
    for e in (4e3, 16e3):
        assert ks_2samp(x[e], response[energy == e]).pvalue > 1e-3, e
    # 8 GeV lies halfway (in log2 E) between the two training points: halfway in every quantile
    for q in (0.1, 0.5, 0.9):
        expected = 0.5 * (np.quantile(response[energy == 4e3], q) + np.quantile(response[energy == 16e3], q))
        assert abs(np.quantile(x[8e3], q) - expected) < 0.004, q
    # one table per energy: a model conditioned on angle or geometry is refused, naming the reason
    with pytest.raises(ValueError, match="energy-only"):
        par04_vae(response_quantiles=11)
    # the table travels with the weights, and the exported graph draws the same totals
    clone = par04_vae_pbwo4(readout=TINY_READOUT, encoder_widths=(6, 4), latent_dim=3, response_quantiles=51)
    clone.load_state_dict(model.state_dict())
    assert bool(clone.response_fitted) and torch.equal(clone.response_table, model.response_table)
    path = export_onnx(model, tmp_path / "vae.onnx")
    assert onnx_parity(model, path, np.geomspace(2e3, 30e3, 16))["ok"]


# -- the autoregressive model -----------------------------------------------------------------------
def small_ar(**kw) -> FastAR:
    torch.manual_seed(0)
    return fast_ar(**{**dict(width=8, n_conv=2, n_components=3, cond_hidden=16, context_layers=2), **kw}).eval()


def test_ar_shapes_and_readouts():
    model = fast_ar()
    assert model.grid == (45, 16, 9) and model.noise_dim == 2 * 6480
    big = fast_ar_24()
    assert big.readout.shape == (24, 24, 24) and big.n_voxels == 24**3
    assert big.readout.layers[0].r_edges[-1] == pytest.approx(48.0)
    with pytest.raises(ValueError, match="regular"):
        fast_ar(readout="calochallenge-1-photons")
    with pytest.raises(ValueError, match="rescale"):
        fast_ar(transform=[{"kind": "divide_by_incident"}, {"kind": "log"}])


@pytest.mark.parametrize("layer", [0, 7, 44])
def test_ar_training_pass_is_causal(layer):
    """Perturbing layer l changes nothing predicted for layers <= l, nor the likelihood of layers < l."""
    model = small_ar()
    batch = synthetic_batch(model, 3)
    n, (L, A, R) = 3, model.grid
    showers = batch["showers"].reshape(n, L, A, R).clone()
    showers[:, layer] = showers[:, layer] * 3.0 + 50.0  # every voxel of layer l changes, zeros included
    perturbed = {**batch, "showers": showers.reshape(n, -1)}
    with torch.no_grad():
        p0 = model.distribution_params(batch["showers"], batch["energy"], batch["conditions"])
        p1 = model.distribution_params(perturbed["showers"], batch["energy"], batch["conditions"])
        nll0 = sum(model.layer_nll(batch))
        nll1 = sum(model.layer_nll(perturbed))
    torch.testing.assert_close(p1[:, :layer + 1], p0[:, :layer + 1], rtol=0, atol=1e-6)
    torch.testing.assert_close(nll1[:, :layer], nll0[:, :layer], rtol=0, atol=1e-5)
    assert not torch.allclose(nll1[:, layer], nll0[:, layer])  # layer l's own term sees its data
    if layer + 1 < L:
        assert not torch.allclose(p1[:, layer + 1], p0[:, layer + 1])  # the test can see a change


def test_ar_sample_layer_depends_only_on_noise_up_to_it():
    model = small_ar()
    L, A, R = model.grid
    cond = synthetic_batch(model, 2)["conditions"]
    noise = torch.randn(2, model.noise_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model.generate(noise, cond).reshape(2, L, A, R)
        for layer in (0, 10, 30):
            moved = noise.reshape(2, L, 2 * A * R).clone()
            moved[:, layer] += 1.5
            out = model.generate(moved.reshape(2, -1), cond).reshape(2, L, A, R)
            assert torch.equal(out[:, :layer], ref[:, :layer])
            assert not torch.equal(out[:, layer], ref[:, layer])


def test_ar_nll_matches_torch_distributions():
    """The loss is -log of: P(empty) for an empty voxel, P(hit) × Gaussian-mixture density of log u otherwise."""
    model = small_ar()
    batch = synthetic_batch(model, 2)
    with torch.no_grad():
        params = model.distribution_params(batch["showers"], batch["energy"], batch["conditions"])
        nll_zero, nll_energy = model.layer_nll(batch)
        loss = model.losses(batch)["loss"]
    logits, mu, sigma = model._split(params.double())
    move = lambda t: t.movedim(2, -1)  # (N, L, K, A, R) → (N, L, A, R, K)
    mix = torch.distributions.MixtureSameFamily(torch.distributions.Categorical(logits=move(logits[:, :, 1:])),
                                                torch.distributions.Normal(move(mu), move(sigma)))
    u = (batch["showers"] / batch["energy"][:, None]).double().reshape(params.shape[0], *model.grid)
    empty = u <= 0
    p_empty = torch.softmax(logits, dim=2)[:, :, 0]
    nll = torch.where(empty, -p_empty.log(), -(1 - p_empty).log() - mix.log_prob(u.clamp_min(1e-30).log()))
    torch.testing.assert_close((nll_zero + nll_energy).double(), nll.sum((2, 3)), rtol=1e-4, atol=1e-3)
    assert loss.item() == pytest.approx(nll.sum((1, 2, 3)).mean().item(), rel=1e-5)


def test_ar_sampler_draws_from_the_predicted_distribution():
    """With hand-set parameters (P(empty) = 0.3, then weights 0.25 / 0.75 at log u = -8 / -2, sigma 0.5),
    the noise-driven sampler reproduces the empty fraction, the component weights and their spread."""
    model = small_ar(n_components=2)
    n = 40000
    params = torch.zeros(n, 1 + 3 * 2, 1, 1)
    params[:, 0:3] = torch.tensor([0.3, 0.7 * 0.25, 0.7 * 0.75]).log()[:, None, None]
    params[:, 3:5] = torch.tensor([-8.0, -2.0])[:, None, None]
    params[:, 5:7] = math.log(math.expm1(0.5 - model.config.min_scale))  # sigma = 0.5
    g = torch.Generator().manual_seed(0)
    u = model._sample_layer(params, torch.rand(n, 1, 1, 1, generator=g), torch.randn(n, 1, 1, 1, generator=g)).ravel()
    hit = u > 0
    assert (~hit).float().mean().item() == pytest.approx(0.3, abs=0.01)
    y = u[hit].log()
    low = y < -5
    assert low.float().mean().item() == pytest.approx(0.25, abs=0.01)
    assert y[low].mean().item() == pytest.approx(-8.0, abs=0.02) and y[low].std().item() == pytest.approx(0.5, abs=0.02)
    assert y[~low].mean().item() == pytest.approx(-2.0, abs=0.02)
    assert u.max().item() <= math.exp(model.config.max_log_fraction)
