"""The classifier test (CaloFlow, CaloChallenge): can a network tell generated showers from the
reference? AUC 0.5 means it cannot; 1.0 means it always can.

A version of the CaloChallenge 2022 classifier (``evaluate.py`` of CaloChallenge/homepage):

- input: low level [log10 E_inc, voxels / E_inc] (:func:`low_level_features`) or the high-level
  feature vector (``validate.features.feature_matrix``), standardised on the training split;
- an MLP (LeakyReLU), BCE-with-logits, Adam; the epoch with the best test-split loss is kept;
- each class is split train / test / validation (60/20/20 by default);
- the network's output is calibrated on the test split by isotonic regression (scikit-learn's
  ``IsotonicRegression(out_of_bounds="clip", y_min=1e-6, y_max=1-1e-6)``, as the CaloChallenge);
- reported on the validation split: the **AUC** and the **JSD** = (ln 2 − BCE) / ln 2 of the
  calibrated probabilities (the CaloChallenge's estimate of the Jensen-Shannon divergence in bits:
  0 for indistinguishable samples, 1 for disjoint ones; it can come out slightly negative when the
  calibrated classifier is worse than a coin on the validation split).

Its size (``hidden``, ``epochs``) is configurable, so that it runs on a CPU in tests and at the
CaloChallenge's size (3 × 512, 50 epochs) on a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

__all__ = ["ClassifierConfig", "SIZES", "auc", "classifier_auc", "jsd_from_probabilities", "low_level_features"]


@dataclass
class ClassifierConfig:
    hidden: tuple[int, ...] = (512, 512, 512)
    epochs: int = 30
    batch_size: int = 256
    learning_rate: float = 2e-4
    split: tuple[float, float, float] = (0.6, 0.2, 0.2)  # train, test, validation (per class)
    seed: int = 0
    device: str = "cpu"
    calibrate: bool = True


#: named sizes: "tiny" for tests, "cpu" for a laptop, "full" for the CaloChallenge's network on a GPU
SIZES = {
    "tiny": dict(hidden=(64, 64), epochs=15, batch_size=128, learning_rate=1e-3),
    "cpu": dict(hidden=(256, 256), epochs=30, batch_size=256, learning_rate=5e-4),
    "full": dict(hidden=(512, 512, 512), epochs=50, batch_size=1000, learning_rate=2e-4),
}


def jsd_from_probabilities(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """(ln 2 − BCE) / ln 2 of calibrated probabilities: the CaloChallenge's JSD estimate, in bits."""
    y = np.asarray(labels, dtype=np.float64)
    p = np.clip(np.asarray(probabilities, dtype=np.float64), 1e-6, 1 - 1e-6)
    bce = -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))
    return float((np.log(2.0) - bce) / np.log(2.0))


def low_level_features(showers: np.ndarray, energy_mev: np.ndarray) -> np.ndarray:
    """(N, 1 + n_voxels): log10 of E_inc in GeV, then the voxel energies over E_inc."""
    e = np.asarray(energy_mev, dtype=np.float64).ravel()
    return np.concatenate([np.log10(e / 1000.0)[:, None], np.asarray(showers, dtype=np.float64) / e[:, None]],
                          axis=1).astype(np.float32)


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (the Mann-Whitney statistic, ties counted half)."""
    from scipy.stats import rankdata

    labels = np.asarray(labels).astype(bool)
    ranks = rankdata(scores)
    n1, n0 = labels.sum(), (~labels).sum()
    if n1 == 0 or n0 == 0:
        raise ValueError("AUC needs both classes")
    return float((ranks[labels].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def classifier_auc(x_gen: np.ndarray, x_ref: np.ndarray, cfg: ClassifierConfig | None = None) -> dict:
    """Train a classifier generated (1) vs reference (0) on feature arrays (N, F) and (M, F).

    Returns, on the validation split, ``auc`` and ``jsd`` (of the isotonic-calibrated output when
    ``cfg.calibrate``), and ``auc_test``, ``epoch`` kept, ``n_train``, ``n_val``.
    """
    cfg = cfg or ClassifierConfig()
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)

    def split(x):
        idx = rng.permutation(len(x))
        a, b = int(cfg.split[0] * len(x)), int((cfg.split[0] + cfg.split[1]) * len(x))
        return x[idx[:a]], x[idx[a:b]], x[idx[b:]]

    with np.errstate(over="ignore"):  # values beyond float32 become inf, refused below by row
        arrays = [np.asarray(x_gen, np.float32), np.asarray(x_ref, np.float32)]
    for name, x in zip(("generated", "reference"), arrays):
        bad = ~np.isfinite(x).all(axis=1)
        if bad.any():
            raise ValueError(f"classifier input: {int(bad.sum())} of {len(x)} {name} rows hold NaN or inf "
                             f"(or values beyond float32), e.g. row {int(np.flatnonzero(bad)[0])}")
    parts = [split(x) for x in arrays]

    def join(i):
        x = np.concatenate([parts[0][i], parts[1][i]])
        y = np.concatenate([np.ones(len(parts[0][i])), np.zeros(len(parts[1][i]))]).astype(np.float32)
        return torch.as_tensor(x), torch.as_tensor(y)

    (xtr, ytr), (xte, yte), (xva, yva) = join(0), join(1), join(2)
    mean, std = xtr.mean(0), xtr.std(0) + 1e-6  # standardise on the training split only
    xtr, xte, xva = (xtr - mean) / std, (xte - mean) / std, (xva - mean) / std
    layers, width = [], xtr.shape[1]
    for h in cfg.hidden:
        layers += [nn.Linear(width, h), nn.LeakyReLU(0.2)]
        width = h
    net = nn.Sequential(*layers, nn.Linear(width, 1)).to(cfg.device)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.learning_rate)
    loss_fn = nn.BCEWithLogitsLoss()
    best = (np.inf, None, -1)
    for epoch in range(cfg.epochs):
        net.train()
        perm = torch.randperm(len(xtr))
        for i in range(0, len(xtr), cfg.batch_size):
            b = perm[i:i + cfg.batch_size]
            opt.zero_grad()
            loss_fn(net(xtr[b].to(cfg.device)).squeeze(1), ytr[b].to(cfg.device)).backward()
            opt.step()
        net.eval()
        with torch.no_grad():
            test_loss = float(loss_fn(net(xte.to(cfg.device)).squeeze(1), yte.to(cfg.device)))
        if test_loss < best[0]:
            best = (test_loss, {k: v.clone() for k, v in net.state_dict().items()}, epoch)
    net.load_state_dict(best[1])
    with torch.no_grad():
        s_va = net(xva.to(cfg.device)).squeeze(1).cpu().numpy()
        s_te = net(xte.to(cfg.device)).squeeze(1).cpu().numpy()
    p_te, p_va = 1.0 / (1.0 + np.exp(-s_te)), 1.0 / (1.0 + np.exp(-s_va))
    if cfg.calibrate:
        from sklearn.isotonic import IsotonicRegression

        iso = IsotonicRegression(out_of_bounds="clip", y_min=1e-6, y_max=1 - 1e-6).fit(p_te, yte.numpy())
        p_va = iso.predict(p_va)
    return {"auc": auc(yva.numpy(), p_va), "jsd": jsd_from_probabilities(yva.numpy(), p_va),
            "auc_test": auc(yte.numpy(), s_te), "epoch": best[2], "n_train": len(xtr), "n_val": len(xva)}
