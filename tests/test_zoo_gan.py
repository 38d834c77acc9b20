"""FastCaloGAN (zoo.fastcalogan): shapes, the WGAN-GP losses against closed-form values, and generate."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from showers.detector import get_detector
from showers.readout import Layer, Readout
from zoo.fastcalogan import (FastCaloGAN, FastCaloGANConfig, fastcalogan, fastcalogan_pbwo4, fastcalogan_pion,
                             for_region)

# 2 layers x 2 alpha x 2 r = 8 voxels: small enough for exact checks and quick training steps
TINY = Readout("tiny", (Layer((0.0, 1.0, 2.0), 2), Layer((0.0, 1.0, 2.0), 2)))


def tiny_model(**overrides) -> FastCaloGAN:
    torch.manual_seed(0)
    cfg = {"readout": TINY, "latent_dim": 4, "generator_widths": (8, 16), "critic_widths": (16, 16), **overrides}
    return fastcalogan(**cfg)


def synthetic_batch(model: FastCaloGAN, n: int = 32, seed: int = 1) -> dict:
    """Showers whose voxels share out ~60 % of E_inc (MeV) at FastCaloGAN's energy points."""
    g = torch.Generator().manual_seed(seed)
    energy = 256.0 * 2.0 ** torch.randint(0, 15, (n,), generator=g).double()
    frac = torch.distributions.Dirichlet(torch.ones(model.n_voxels)).sample((n,)) * 0.6
    showers = (frac * energy[:, None]).float()
    return {"showers": showers, "energy": energy.float(), "conditions": model.encode_conditions(energy),
            **model.draw_training_noise("critic", n, g)}  # latent, gp_mix


def set_linear_critic(model: FastCaloGAN, voxel_weight, cond_weight: float = 5.0) -> None:
    """Make D(c, x) = cond_weight * c + voxel_weight . x + 0.3 (critic_widths=(): one Linear)."""
    (layer,) = model.critic.layers
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[cond_weight, *voxel_weight]], dtype=torch.float32))
        layer.bias.fill_(0.3)


# -- construction -----------------------------------------------------------------------------------
@pytest.mark.parametrize("build, n_voxels, critic_hidden", [
    (fastcalogan, 368, (368, 368, 368)),
    (fastcalogan_pion, 533, (533, 533, 533)),
    (fastcalogan_pbwo4, 6480, (1024, 512, 256)),
])
def test_variant_shapes(build, n_voxels, critic_hidden):
    model = build()
    assert (model.family, model.kind, model.variant) == ("fastcalogan", "adversarial", build.__name__)
    assert (model.n_voxels, model.n_cond, model.noise_dim) == (n_voxels, 1, 50)
    # G 50-50-100-200-N (the condition appended to the latent), D N-N-N-N-1 (the condition prepended)
    g = [(layer.in_features, layer.out_features) for layer in model.generator.layers]
    d = [(layer.in_features, layer.out_features) for layer in model.critic.layers]
    assert g == [(51, 50), (50, 100), (100, 200), (200, n_voxels)]
    widths = (n_voxels + 1, *critic_hidden, 1)
    assert d == list(zip(widths[:-1], widths[1:]))
    cond = model.encode_conditions([256.0, 65536.0, 4194304.0])
    assert model.generate(torch.randn(3, 50), cond).shape == (3, n_voxels)
    assert model.critic_forward(torch.rand(3, n_voxels), cond).shape == (3,)


def test_config_defaults_and_conditions():
    cfg = FastCaloGANConfig()
    assert (cfg.latent_dim, cfg.generator_widths, cfg.critic_widths) == (50, (50, 100, 200), None)
    assert (cfg.learning_rate, cfg.beta1, cfg.beta2, cfg.batch_size, cfg.n_critic, cfg.gp_lambda) == (
        1e-4, 0.5, 0.999, 128, 5, 10.0)
    assert cfg.transform == [{"kind": "divide_by_incident"}]
    model = tiny_model()
    # log encoding over 256 MeV - 4.19 TeV: the ends map to 0 and 1, and E_inc comes back in torch ops
    energy = np.array([256.0, 8192.0, 4194304.0])
    cond = model.encode_conditions(energy)
    assert cond[:, 0].tolist() == pytest.approx([0.0, 5 / 14, 1.0], abs=1e-6)
    assert model.energy_from_conditions(cond).numpy() == pytest.approx(energy, rel=1e-5)


def test_overrides_and_for_region():
    region = get_detector("atlas-like").region("electron_eta_100_105")
    model = for_region(region, latent_dim=10)
    assert model.n_voxels == region.readout.n_voxels and model.noise_dim == 10
    assert fastcalogan_pion(readout=TINY).n_voxels == 8
    assert fastcalogan_pbwo4(readout=TINY, critic_widths=(4,)).critic.layers[0].out_features == 4
    with pytest.raises(TypeError, match="unknown config fields"):
        fastcalogan(latent=3)
    with pytest.raises(ValueError, match="output"):
        tiny_model(output="tanh")


def test_config_json_round_trip_rebuilds_the_model():
    model = tiny_model()
    config = json.loads(json.dumps(model.config.to_dict()))
    rebuilt = FastCaloGAN(FastCaloGANConfig(**config), variant=model.variant)
    rebuilt.load_state_dict(model.state_dict())
    assert rebuilt.config == model.config
    z, cond = torch.randn(5, 4), model.encode_conditions([1e3, 1e4, 1e5, 1e6, 4e6])
    torch.testing.assert_close(rebuilt.generate(z, cond), model.generate(z, cond), rtol=0, atol=0)


# -- the gradient penalty against closed form -------------------------------------------------------
@pytest.mark.parametrize("voxel_weight, expected", [
    ([1.0, 0, 0, 0, 0, 0, 0, 0], 0.0),                  # unit norm: ||dD/dx|| = 1 everywhere
    ([0.6, 0.8, 0, 0, 0, 0, 0, 0], 0.0),                # unit norm, 0.36 + 0.64 = 1
    ([0.5] * 4 + [-0.5] * 4, (math.sqrt(2) - 1) ** 2),      # norm sqrt(8 * 0.25) = sqrt(2)
    ([3.0, 4.0, 0, 0, 0, 0, 0, 0], 16.0),               # norm 5: (5 - 1)^2
    ([0.0] * 8, 1.0),                                   # a constant critic: (0 - 1)^2
])
def test_gradient_penalty_of_a_linear_critic(voxel_weight, expected):
    # For D linear in x the gradient is the voxel weight vector wherever it is evaluated, so the
    # penalty is (||w_voxel|| - 1)^2 for any real, fake, eps; the condition weight (5) must not count.
    model = tiny_model(critic_widths=())
    set_linear_critic(model, voxel_weight)
    batch = synthetic_batch(model, n=6)
    real = model.preprocess(batch["showers"], batch["energy"])
    fake = torch.rand(6, 8)
    gp = model.gradient_penalty(real, fake, batch["conditions"], torch.rand(6))
    assert gp.item() == pytest.approx(expected, abs=1e-6)
    assert model.critic_loss(batch)["gp"].item() == pytest.approx(expected, abs=1e-6)
    if expected > 0:
        assert gp.item() > 0


def test_gradient_penalty_is_differentiable_in_the_critic_weights():
    # d/dw (||w|| - 1)^2 = 2 (||w|| - 1) w / ||w||: for w = (3, 4, 0...) that is 2 * 4 * (0.6, 0.8) =
    # (4.8, 6.4); the condition weight gets nothing. A penalty whose inner gradient were detached
    # would leave these gradients at zero.
    model = tiny_model(critic_widths=())
    set_linear_critic(model, [3.0, 4.0, 0, 0, 0, 0, 0, 0])
    cond = model.encode_conditions([1e3, 1e5])
    model.gradient_penalty(torch.rand(2, 8), torch.rand(2, 8), cond, torch.rand(2)).backward()
    grad = model.critic.layers[0].weight.grad[0]
    torch.testing.assert_close(grad, torch.tensor([0.0, 4.8, 6.4, 0, 0, 0, 0, 0, 0]), atol=1e-5, rtol=1e-5)


def test_critic_loss_of_a_linear_critic_by_hand():
    # D(c, x) = w . x + 5 c + 0.3 with ||w|| = 1: loss = mean(w . fake) - mean(w . real) (the
    # condition and bias terms cancel between real and fake), and the penalty vanishes.
    model = tiny_model(critic_widths=())
    w = torch.tensor([0.6, 0.8, 0, 0, 0, 0, 0, 0])
    set_linear_critic(model, w.tolist())
    batch = synthetic_batch(model, n=8)
    out = model.critic_loss(batch)
    fake = model.generator_forward(batch["latent"], batch["conditions"])
    real = batch["showers"] / batch["energy"][:, None]
    expected = (fake @ w).mean() - (real @ w).mean()
    assert out["loss"].item() == pytest.approx(expected.item(), abs=1e-5)
    assert out["wasserstein"].item() == pytest.approx(-expected.item(), abs=1e-5)
    assert out["gp"].item() == pytest.approx(0.0, abs=1e-6)


# -- which losses reach which network ---------------------------------------------------------------
def test_critic_loss_reaches_only_the_critic_and_generator_loss_reaches_g():
    model = tiny_model()
    batch = synthetic_batch(model)
    model.critic_loss(batch)["loss"].backward()
    assert all(p.grad is None for p in model.generator_parameters())
    critic_grads = [p.grad for p in model.critic_parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in critic_grads)
    assert sum(g.abs().sum() for g in critic_grads) > 0

    model.zero_grad(set_to_none=True)
    out = model.generator_loss(batch)
    assert out["loss"].item() == pytest.approx(-out["d_fake"].item())
    out["loss"].backward()
    gen_grads = [p.grad for p in model.generator_parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in gen_grads)
    assert all(g.abs().sum() > 0 for g in gen_grads[::2])  # every layer's weight gets a gradient


def test_a_few_alternating_steps_stay_finite():
    model = tiny_model()
    cfg = model.config
    opt_d = torch.optim.Adam(model.critic_parameters(), lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2))
    opt_g = torch.optim.Adam(model.generator_parameters(), lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2))
    before = [p.detach().clone() for p in model.generator_parameters()]
    batch = synthetic_batch(model, n=32)
    for _ in range(3):
        for _ in range(cfg.n_critic):
            opt_d.zero_grad(set_to_none=True)
            d = model.critic_loss(batch)
            d["loss"].backward()
            opt_d.step()
        opt_g.zero_grad(set_to_none=True)
        g = model.generator_loss(batch)
        g["loss"].backward()
        opt_g.step()
        assert all(math.isfinite(v.item()) for v in (*d.values(), *g.values()))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.generator_parameters()))


# -- inference ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("output", ["relu", "sigmoid"])
def test_generate_is_deterministic_non_negative_and_in_mev(output):
    model = tiny_model(output=output).eval()
    energy = np.array([256.0, 4096.0, 65536.0, 4194304.0, 1000.0])
    cond = model.encode_conditions(energy)
    z = torch.randn(5, 4)
    with torch.no_grad():
        a, b = model.generate(z, cond), model.generate(z.clone(), cond)
        other = model.generate(torch.randn(5, 4), cond)
        fraction = model.generator_forward(z, cond)
    assert a.shape == (5, 8) and (a >= 0).all()
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, other)
    # MeV = G's output (E / E_inc) times the incident energy decoded from the conditions
    torch.testing.assert_close(a, fraction.clamp(min=0) * torch.tensor(energy, dtype=torch.float32)[:, None],
                               rtol=1e-5, atol=0)
    if output == "sigmoid":
        assert (a <= torch.tensor(energy, dtype=torch.float32)[:, None] * (1 + 1e-6)).all()
    assert model.sample(energy, generator=torch.Generator().manual_seed(3)).shape == (5, 8)


def test_parameter_groups_are_disjoint_and_cover_the_model():
    model = tiny_model()
    g, d = {id(p) for p in model.generator_parameters()}, {id(p) for p in model.critic_parameters()}
    assert not g & d and g | d == {id(p) for p in model.parameters()}
    # plain Linear stacks, so K regions' state dicts can be stacked into a bank
    assert all(k.split(".")[0] in ("generator", "critic") and k.split(".")[1] == "layers"
               for k in model.state_dict())
