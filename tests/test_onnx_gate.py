"""The ONNX parity gate holds for every registered variant once trained, not only at initialisation
(issue #14: the flagship par04_vae_pbwo4 failed it after 30000 iterations because ONNX Runtime's CPU
Sigmoid is wrong below -8 and the trained decoder feeds it logits of -15 to -30).

How "trained" is reached in seconds: each variant trains for a few Adam steps at a large learning rate
through the real tracked trainer (so the checkpoint, its metrics and ``publish`` are the real ones),
then its output layer is pushed to the extremes that a long training reaches (``_age``): the
flagship's logits spread over -30 .. -5 (most voxels of a shower are nearly always empty, and the
decoder learns it), fast_ar's voxel means down to 1e-10 of E_inc with sharp outcome probabilities,
FastCaloGAN's outputs mostly cut by the ReLU with the rest from cancelling terms. Training alone
gets there only after thousands of steps (minutes per model on this CPU; 200 steps leave the
flagship's logits above -15). Readouts are shrunk where the variant's own would only slow the export
(par04_vae's 40500 voxels, fast_ar's 45 and 24 unrolled layers); the flagship keeps its own."""

import logging
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import calozoo.tracked
from calozoo.tracked import train_tracked
from registry.publish import ParityError, parity_gate, publish
from showers.readout import Readout
from trainers.data import ShowerData
from trainers.loop import TrainConfig
from zoo import create_model, list_models
from zoo.base import log1p, one_minus_exp_neg, sigmoid
from zoo.checkpoint import CheckpointManager, load_checkpoint
from zoo.export import export_like, export_onnx, graph_key, onnx_parity, onnx_session, relative_difference
from .conftest import mlflow_store

FIXTURE = Path(__file__).parent / "fixtures" / "g4_pbwo4_electrons_reduced.h5"

SMALL_READOUT = Readout.regular("gate-small", 5, 4, [0.0, 5.0, 10.0, 20.0, 40.0], 8.903).to_dict()  # 80 voxels
AR_READOUT = Readout.regular("gate-ar", 3, 4, [0.0, 5.0, 10.0, 20.0], 8.903).to_dict()  # 3 unrolled layers
LR = 3e-2
# small widths and readouts (module docstring); the flagship keeps its g4-pbwo4 readout
GATE = {
    "par04_vae": dict(readout=SMALL_READOUT, batch_size=16, learning_rate=LR),
    "par04_vae_ds2": dict(readout=SMALL_READOUT, batch_size=16, learning_rate=LR),
    "par04_vae_pbwo4": dict(batch_size=16, learning_rate=LR),
    "par04_vae_region": dict(batch_size=16, learning_rate=LR),
    "fastcalogan": dict(batch_size=16, n_critic=2, learning_rate=LR, critic_widths=(32, 16)),
    "fastcalogan_pion": dict(batch_size=16, n_critic=2, learning_rate=LR, critic_widths=(32, 16)),
    "fastcalogan_pbwo4": dict(readout=SMALL_READOUT, batch_size=16, n_critic=2, learning_rate=LR,
                              critic_widths=(32, 16)),
    "fast_ar": dict(readout=AR_READOUT, batch_size=8, width=8, n_conv=1, n_components=2, learning_rate=LR),
    "fast_ar_24": dict(readout=AR_READOUT, batch_size=8, width=8, n_conv=1, n_components=2, learning_rate=LR),
    "flow_matching": dict(batch_size=16, shape_widths=(32, 32), energy_widths=(16, 16), learning_rate=LR),
    "flow_matching_pbwo4": dict(readout=SMALL_READOUT, batch_size=16, shape_widths=(32, 32), energy_widths=(16, 16),
                                learning_rate=LR),
}


def test_every_variant_has_a_gate_config():
    assert set(GATE) == set(list_models())


# -- the elementwise functions, in ONNX Runtime against float64 ------------------------------------------------
class _Functions(torch.nn.Module):
    def forward(self, x, lam):
        return sigmoid(x), log1p(lam), one_minus_exp_neg(lam)


def test_the_graphs_functions_are_exact_in_onnx_runtime(tmp_path):
    x = torch.tensor([-87.0, -80.0, -30.0, -20.0, -16.9, -12.0, -8.0, -1.0, 0.0, 1.0, 8.0, 16.9, 30.0])
    lam = torch.tensor([1e-12, 1e-9, 1e-6, 1e-3, 0.1, 0.2499, 0.25, 1.0, 10.0, 80.0, 1e3, 1e6, 3e-1])
    path = tmp_path / "f.onnx"
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_Functions(), (x, lam), str(path), dynamo=True, input_names=["x", "lam"],
                          output_names=["s", "l", "p"], opset_version=18, verbose=False)
    ort = onnx_session(path).run(None, {"x": x.numpy(), "lam": lam.numpy()})
    exact = [torch.sigmoid(x.double()), torch.log1p(lam.double()), -torch.expm1(-lam.double())]
    for name, o, t, e in zip(("sigmoid", "log1p", "1 - exp(-x)"), ort, _Functions()(x, lam), exact):
        e = e.numpy()
        assert np.max(np.abs(o - e) / e) < 1e-6, (name, o, e)  # ONNX Runtime
        assert np.max(np.abs(t.numpy() - e) / e) < 1e-6, (name, t, e)  # torch, unchanged to rounding
    # the gradient is sigmoid's, at 0 too (FastCaloGAN trains through it with output="sigmoid")
    g = torch.tensor([-30.0, -3.0, 0.0, 3.0, 30.0], requires_grad=True)
    sigmoid(g).sum().backward()
    s = torch.sigmoid(g.detach())
    torch.testing.assert_close(g.grad, s * (1 - s))


def test_the_gate_sees_voxels_far_below_the_shower_and_not_rounding():
    rng = np.random.default_rng(0)
    # one shower: a core of large voxels and a halo from 1e-3 down to 1e-13 of the shower's energy
    ref = np.concatenate([rng.uniform(1e3, 1e4, 20), 1e5 * 10.0 ** rng.uniform(-13, -3, 2000)])[None]
    total = ref.sum()
    rounded = (ref * (1 + 2e-7 * rng.standard_normal(ref.shape))).astype(np.float32)
    assert relative_difference(rounded, ref) < 1e-5  # float32 rounding: passes at any size
    # the rounding of terms of a typical voxel's size, in a voxel that is their small difference
    cancelled = ref + 5e-7 * ref.mean() * rng.standard_normal(ref.shape)
    assert relative_difference(cancelled, ref) < 1e-4
    band = (ref > 1e-8 * total) & (ref < 5e-8 * total)
    wrong = np.where(band, 2 * ref, ref)  # +100 % in the voxels of 1e-8 .. 5e-8 of the shower
    assert relative_difference(wrong, ref) > 5e-4
    # which the former floor (1 % of the largest voxel) let through
    assert np.max(np.abs(wrong - ref) / np.maximum(ref, 1e-2 * ref.max())) < 1e-4
    tiny = np.where(ref < 1e-11 * total, 0.0, ref)  # far below: read as absolute
    assert relative_difference(tiny, ref) < 1e-4


# -- the gate refuses wrong graphs ------------------------------------------------------------------------------
TRAINED = {"energy_mev": [2048.0, 131072.0]}  # the range of _data below


def _tampered(path, out, name_part: str, factor: float):
    """A copy of the ONNX file ``path`` with the initializer whose name contains ``name_part`` scaled by ``factor``."""
    proto = onnx.load(str(path))
    init = next(i for i in proto.graph.initializer if name_part in i.name)
    value = onnx.numpy_helper.to_array(init) * np.asarray(factor, dtype=onnx.numpy_helper.to_array(init).dtype)
    init.CopyFrom(onnx.numpy_helper.from_array(value, init.name))
    onnx.save(proto, str(out))
    return out


def test_an_inaccurate_kernel_is_refused(tmp_path, monkeypatch):
    """par04_vae_ds2 with trained-like logits (-30 .. -5) exported with torch.sigmoid, i.e. ONNX's Sigmoid,
    which ONNX Runtime computes wrongly below about -8 (zoo.base): refused; the model as written passes."""
    import zoo.par04_vae

    torch.manual_seed(0)
    model = create_model("par04_vae_ds2", **GATE["par04_vae_ds2"]).eval()
    state = {"model": model.state_dict()}
    _age("par04_vae", state, model.n_voxels)
    model.load_state_dict(state["model"])
    assert parity_gate(model, export_onnx(model, tmp_path / "good.onnx"), TRAINED)["ok"]
    monkeypatch.setattr(zoo.par04_vae, "sigmoid", torch.sigmoid)  # torch's own stays exact: the arbiter too
    with pytest.raises(ParityError, match="differs from the float64 torch model"):
        parity_gate(model, export_onnx(model, tmp_path / "sigmoid.onnx"), TRAINED)


def test_a_changed_op_is_refused(tmp_path):
    """FastCaloGAN's graph with one Relu made a LeakyRelu (negative activations leak 1 %): refused."""
    torch.manual_seed(0)
    model = create_model("fastcalogan", **GATE["fastcalogan"]).eval()
    path = export_onnx(model, tmp_path / "gan.onnx")
    assert parity_gate(model, path, TRAINED)["ok"]
    proto = onnx.load(str(path))
    next(n for n in proto.graph.node if n.op_type == "Relu").op_type = "LeakyRelu"
    onnx.save(proto, str(tmp_path / "leaky.onnx"))
    with pytest.raises(ParityError, match="differs from the float64 torch model"):
        parity_gate(model, tmp_path / "leaky.onnx", TRAINED)
    # a NaN is no difference at all to a comparison: non-finite voxels are refused as such
    nan = _tampered(path, tmp_path / "nan.onnx", "layers.3.bias", float("nan"))
    with pytest.raises(ParityError, match="non-finite voxel energies"):
        parity_gate(model, nan, TRAINED)


def test_threshold_edge_voxels_are_left_out_counted_and_bounded(tmp_path, monkeypatch):
    """A hit just above the threshold in one runtime and zeroed in the other: flow matching's threshold is put
    just under one voxel's float64 value and the exported graph's just above it. The flip is left out and
    counted (its layer compared on the other voxels' shares), and at most MAX_EDGE_FRACTION of the voxels may
    be; a threshold moved by more than EDGE_RTOL flips voxels that are not at its edge: refused."""
    import zoo.export

    torch.manual_seed(0)
    model = create_model("flow_matching", **GATE["flow_matching"]).eval()
    data = _data(model)
    model.fit_data(data.energy, data.showers)
    energies = np.geomspace(2048.0, 131072.0, 16)
    noise = torch.randn(len(energies), model.noise_dim, generator=torch.Generator().manual_seed(0))  # onnx_parity's
    cond = model.encode_conditions(energies).double()
    with torch.no_grad():  # the values the threshold is compared with, in float64
        values = model.double().generate(noise.double(), cond, torch.zeros((), dtype=torch.float64)).numpy()
    model.float()
    hits = np.sort(values[values > 0].ravel())
    edge = float(hits[len(hits) // 20])  # a small hit, with others above and below it
    model.hit_threshold.fill_(edge * (1 - 2e-4))
    path = export_onnx(model, tmp_path / "fm.onnx")
    assert onnx_parity(model, path, energies)["edge_voxels"] == 0

    flipped = _tampered(path, tmp_path / "edge.onnx", "hit_threshold", (1 + 2e-4) / (1 - 2e-4))
    parity = onnx_parity(model, flipped, energies)
    assert parity["ok"] and 1 <= parity["edge_voxels"] <= parity["max_edge_voxels"], parity
    monkeypatch.setattr(zoo.export, "MAX_EDGE_FRACTION", 0.0)
    parity = onnx_parity(model, flipped, energies)
    assert not parity["ok"] and parity["edge_voxels"] > parity["max_edge_voxels"] == 0
    monkeypatch.undo()

    moved = _tampered(path, tmp_path / "moved.onnx", "hit_threshold", 2.0)
    parity = onnx_parity(model, moved, energies)
    assert not parity["ok"] and parity["margin"] < 1e-2, parity


def test_a_graph_reused_with_another_regions_weights_equals_its_own_export(tmp_path):
    """export_like: a fleet region's tensors in another region's exported graph of the same structure give
    the same ONNX Runtime output as the region's own export; a model of another structure is refused."""
    from showers.detector import get_detector
    from zoo.fastcalogan import for_region

    det = get_detector("atlas-like")
    a, b = (for_region(det.region(r), n_critic=2, critic_widths=(32, 16)).eval()
            for r in ("photon_eta_020_025", "photon_eta_025_030"))
    assert a.n_voxels == b.n_voxels and graph_key(a) == graph_key(b)
    template = export_onnx(a, tmp_path / "a.onnx")
    reused = export_like(b, template, tmp_path / "b-reused.onnx", {"region": "b"})
    own = export_onnx(b, tmp_path / "b.onnx")
    assert parity_gate(b, reused, TRAINED)["ok"]
    feed = {"noise": np.random.default_rng(0).standard_normal((8, b.noise_dim), dtype=np.float32),
            "conditions": b.encode_conditions(np.geomspace(2048.0, 131072.0, 8)).numpy()}
    np.testing.assert_array_equal(onnx_session(reused).run(None, feed)[0], onnx_session(own).run(None, feed)[0])
    assert {p.key: p.value for p in onnx.load(str(reused)).metadata_props} == {"region": "b"}
    other = for_region(det.region("photon_eta_350_355"), n_critic=2, critic_widths=(32, 16))
    assert graph_key(other) != graph_key(a) and export_like(other, template, tmp_path / "x.onnx") is None


# -- a flagship trained as long as the README's recipe ----------------------------------------------------------
#: the Frobenius norms of flow_matching_pbwo4's velocity-MLP weight matrices in the README's recipe (the full
#: Geant4 file, the quality table's schedule) at 500 iterations, where the former gate already refused its
#: checkpoint (2.1e-4 against torch); the norms go on growing (by 20-90 % at 3000 iterations), but the weights
#: of a short training scaled that far make torch's own float32 output overflow: a short training's weights
#: are not a long one's, so the stand-in takes these norms raised by STANDIN_SCALE
RECIPE_NORMS_500 = {"energy_net.net.0.weight": 12.26, "energy_net.net.2.weight": 14.02, "energy_net.net.4.weight": 13.72,
                    "energy_net.net.6.weight": 10.71, "shape_net.net.0.weight": 18.30, "shape_net.net.2.weight": 19.38,
                    "shape_net.net.4.weight": 14.12, "shape_net.net.6.weight": 9.51}
STANDIN_SCALE = 1.1


def test_a_deep_trained_flagship_passes_and_a_wrong_one_is_refused(tmp_path):
    """The README's flagship (flow_matching_pbwo4 as its quality table trains it: 6 + 12 unrolled steps,
    renormalised, bounded and thresholded) made numerically like a long-trained one in a minute: 100
    iterations on the Geant4 fixture through the training loop (at a constant learning rate), then every
    weight matrix of its velocity fields scaled to the recipe's trained norms (RECIPE_NORMS_500), which
    sharpens the fields as training does. ONNX Runtime then differs from torch's float32 output by more
    than the former fixed limit of 1e-4 (2.5e-4 here; the recipe's 18000 iterations read 2.2e-4), the
    failure of the README's recipe at full length, yet it is no farther from the float64 model than
    torch's own float32 runs allow: the gate passes it. The same graph with one weight matrix 0.1 % off
    is refused."""
    from trainers.data import load_showers
    from trainers.loop import train
    from zoo import model_from_checkpoint

    data = load_showers(FIXTURE)
    torch.manual_seed(0)
    cfg = TrainConfig(iterations=100, checkpoint_every=100, seed=0, progress=False, n_val_max=90)
    train(create_model("flow_matching_pbwo4", lr_schedule="constant"), data,
          data.subset(np.arange(0, len(data), 10)), cfg, tmp_path / "run")
    best = CheckpointManager(tmp_path / "run" / "checkpoints").best()
    model = model_from_checkpoint(load_checkpoint(tmp_path / "run" / "checkpoints" / best["file"])).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in RECIPE_NORMS_500:
                p.mul_(STANDIN_SCALE * RECIPE_NORMS_500[name] / p.norm())
    trained = {"energy_mev": [float(data.energy.min()), float(data.energy.max())]}
    path = export_onnx(model, tmp_path / "flagship.onnx")
    parity = parity_gate(model, path, trained)
    assert parity["max_rel_diff"] > 1e-4, parity  # the former gate: "differs from torch by ... (limit 0.0001)"
    assert parity["ok"] and parity["margin"] >= 1.0, parity
    wrong = _tampered(path, tmp_path / "wrong.onnx", "shape_net.net.4.weight", 1.001)
    with pytest.raises(ParityError, match="differs from the float64 torch model"):
        parity_gate(model, wrong, trained)


# -- every variant, trained, through the gate into the registry ------------------------------------------------
def _data(model, seed: int = 0) -> ShowerData:
    """Shower-like: a longitudinal gamma profile and an exponential radial one, cut to zero beyond a depth
    and a radius (voxels that are always empty, as in real showers), log-normal voxels, half of them
    empty; 3 energies × 20 showers (the response table needs 10 per point); E_tot/E_inc = 0.95 ± 1 %."""
    rng = np.random.default_rng(seed)
    ro = model.readout
    energy = np.repeat([2048.0, 16384.0, 131072.0], 20)
    depth = (ro.voxel_layer + 0.5) / ro.n_layers * 10.0
    r_mid = ro.voxel_centres[0] / ro.r_edges_union[-1] * 5.0
    profile = depth**2 * np.exp(-depth) * np.exp(-r_mid) * (r_mid < 3.0) * (depth < 8.0)
    f = profile * rng.lognormal(0.0, 1.0, (len(energy), ro.n_voxels)) * (rng.random((len(energy), ro.n_voxels)) > 0.5)
    f *= (0.95 * (1 + 0.01 * rng.standard_normal(len(energy))) / f.sum(1))[:, None]
    spec = model.condition_spec
    angle = rng.uniform(60.0, 90.0, len(energy)) if spec.use_angle else None
    geometry = np.array([spec.geometries[j % len(spec.geometries)] for j in range(len(energy))]) \
        if spec.geometries else None
    return ShowerData((f * energy[:, None]).astype(np.float32), energy, ro, "synthetic", angle=angle, geometry=geometry)


def _age(family: str, state: dict, n_voxels: int) -> None:
    """Push the trained output layer to the extremes of a long training (module docstring), in place."""
    g = torch.Generator().manual_seed(1)
    w = state["model"]
    if family == "par04_vae":
        # logits -30 .. -5 over the voxels (the flagship after 30000 iterations)
        w["to_voxels.bias"] += -5.0 + torch.linspace(-25.0, 0.0, n_voxels)[torch.randperm(n_voxels, generator=g)]
    elif family == "fast_ar":
        k = (w["head.bias"].numel() - 1) // 3
        w["head.bias"][1 + k:1 + 2 * k] -= 12.0  # voxel means of 1e-11 .. 1e-7 of E_inc
        w["head.weight"][: 1 + k] *= 5.0  # sharp outcome probabilities
    elif family == "flow_matching":  # fast velocities: voxel shares over many decades after the exp
        for net in ("energy_net", "shape_net"):
            last = max((k for k in w if k.startswith(f"{net}.net.") and k.endswith(".weight")),
                       key=lambda k: int(k.split(".")[2]))
            w[last] *= 4.0
    else:  # fastcalogan: most outputs below 0 (cut by the ReLU), the others small differences of large terms
        last = max(k for k in w if k.startswith("generator.layers.") and k.endswith(".weight"))
        w[last] *= 4.0
        w[last.replace("weight", "bias")] -= 2.0 * w[last.replace("weight", "bias")].abs().mean()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        root = tmp_path_factory.mktemp("gate")
        mp.setenv("CALOZOO_CACHE", str(root / "cache"))
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        # the validation plot and summary are another test's business (test_registry); they cost seconds per run here
        mp.setattr(calozoo.tracked, "heldout_validation", lambda *a, **k: None)
        yield mlflow_store(root / "mlflow.db"), root


@pytest.mark.parametrize("name", sorted(GATE))
def test_trained_variant_passes_the_gate_and_registers(name, store):
    uri, root = store
    torch.manual_seed(0)
    model = create_model(name, **GATE[name])
    data = _data(model)
    run_dir = root / name
    cfg = TrainConfig(iterations=4, checkpoint_every=2, seed=0, progress=False, n_val_max=60)
    train_tracked(model, data, data, cfg, run_dir, campaign="gate", region=name, uri=uri)
    best = CheckpointManager(run_dir / "checkpoints").best()
    path = run_dir / "checkpoints" / best["file"]
    state = load_checkpoint(path)
    fresh = create_model(name, **GATE[name]).state_dict()
    moved = [k for k, v in state["model"].items() if v.is_floating_point() and not torch.equal(v, fresh[k])]
    assert moved, "training moved no weight"
    _age(model.family, state, model.n_voxels)
    torch.save(state, path)

    if model.family == "par04_vae":  # the regime of the bug: most logits where ONNX Runtime's Sigmoid fails
        from zoo import model_from_checkpoint

        aged = model_from_checkpoint(state).eval()
        with torch.no_grad():
            cond = aged.encode_conditions(data.energy[:8], data.angle if data.angle is None else data.angle[:8],
                                          None if data.geometry is None else list(data.geometry[:8]))
            logits = aged.decode_logits(torch.randn(8, aged.config.latent_dim), cond)
        assert float((logits < -17).float().mean()) > 0.3

    pub = publish(run_dir, uri=uri)
    assert pub.version == "1" and pub.champion and pub.iteration == best["iteration"]
    assert pub.parity["ok"] and pub.parity["margin"] >= 1.0, pub.parity


# -- the exporter -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", list_models())
def test_every_variant_exports_through_the_fast_exporter(variant, tmp_path, caplog):
    """Every variant traces with the TorchScript exporter, without a warning that the trace may not hold
    for other inputs (the dynamo exporter, its fallback, is many times slower); the graph agrees with torch
    at energies other than the trace's."""
    torch.manual_seed(0)
    model = create_model(variant).eval()
    with caplog.at_level(logging.INFO, logger="zoo.export"):
        path = export_onnx(model, tmp_path / "model.onnx")
    assert "dynamo exporter" not in caplog.text, caplog.text
    energies = np.array([1500.0, 70000.0, 300000.0])
    spec = model.condition_spec
    angle = np.array([60.0, 75.0, 90.0]) if spec.use_angle else None
    geometry = [spec.geometries[-1]] * 3 if spec.geometries else None
    noise = torch.randn(3, model.noise_dim)
    cond = model.encode_conditions(energies, angle, geometry)
    with torch.no_grad():
        want = model.inference_module()(noise, cond).numpy()
    got = onnx_session(path).run(None, {"noise": noise.numpy(), "conditions": cond.numpy()})[0]
    assert relative_difference(got, want) < 1e-3
