"""The classifier test (CaloFlow, CaloChallenge): can a network tell generated showers from the
reference? AUC 0.5 means it cannot; 1.0 means it always can.

A compact version of the CaloChallenge low-level classifier: input [log10 E_inc, voxels / E_inc],
an MLP, BCE-with-logits, Adam, the epoch with the best test loss kept, AUC on a separate validation
split. Its size is configurable so that it runs on a CPU in tests and at full size on a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

__all__ = ["ClassifierConfig", "auc", "classifier_auc", "low_level_features"]


@dataclass
class ClassifierConfig:
    hidden: tuple[int, ...] = (512, 512, 512)
    epochs: int = 30
    batch_size: int = 256
    learning_rate: float = 2e-4
    split: tuple[float, float, float] = (0.6, 0.2, 0.2)  # train, test, validation (per class)
    seed: int = 0
    device: str = "cpu"


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

    Returns ``auc`` on the validation split (and ``auc_test``, ``epoch`` kept, sizes).
    """
    cfg = cfg or ClassifierConfig()
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)

    def split(x):
        idx = rng.permutation(len(x))
        a, b = int(cfg.split[0] * len(x)), int((cfg.split[0] + cfg.split[1]) * len(x))
        return x[idx[:a]], x[idx[a:b]], x[idx[b:]]

    parts = [split(np.asarray(x_gen, np.float32)), split(np.asarray(x_ref, np.float32))]

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
    return {"auc": auc(yva.numpy(), s_va), "auc_test": auc(yte.numpy(), s_te), "epoch": best[2],
            "n_train": len(xtr), "n_val": len(xva)}
