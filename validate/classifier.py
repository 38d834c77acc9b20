"""The classifier test (CaloFlow, CaloChallenge): can a network tell generated showers from the
reference? AUC 0.5 means it cannot; 1.0 means it always can.

The CaloChallenge 2022 evaluator's DNN classifier (``code/evaluate.py`` of CaloChallenge/homepage,
modes ``cls-low`` and ``cls-high``), on feature arrays built by ``validate.official``:

- the network: input → ``hidden`` → ... (``layers`` hidden layers, each Linear + LeakyReLU(0.01),
  no dropout) → one logit; the evaluator's is 2048 wide with 3 hidden layers (its input layer and
  ``cls_n_layer=2`` more), in float64 (``torch.set_default_dtype(torch.float64)``);
- the input as given, no standardisation (the evaluator's inputs are scaled by construction: see
  ``validate.official``);
- each class is shuffled and split train / test / validation by the fractions ``split`` (0.6 / 0.2 /
  0.2; the evaluator's ``ttv_split`` without ``dataset``, which takes the fractions of each class);
- Adam (learning rate 2e-4), batches of 1000 reshuffled every epoch, BCE-with-logits, 50 epochs;
  after each epoch the accuracy on the test split; the epoch with the best test accuracy is kept
  (the first of equals; training stops early at a test accuracy of 1, as the evaluator's does);
- the kept network's sigmoid output is calibrated on the test split by isotonic regression
  (``IsotonicRegression(out_of_bounds="clip", y_min=1e-6, y_max=1-1e-6)``), and reported on the
  validation split: the **AUC** and the **JSD** = (ln 2 − BCE) / ln 2 of the calibrated
  probabilities (the evaluator's estimate of the Jensen-Shannon divergence in bits: 0 for
  indistinguishable samples, 1 for disjoint ones; slightly negative when the calibrated classifier is
  worse than a coin on the validation split).

Where it differs from the evaluator, and why: the generated sample is class 1 and the reference
class 0 (the evaluator labels them the other way round; AUC and JSD are symmetric under the swap);
the two samples may differ in size (the evaluator asserts equal sizes); the shuffles are seeded
(the evaluator's use numpy's global state), so that :func:`classifier_seeds` can give the spread
over seeds that one run hides.

Sizes (:data:`SIZES`): "official" is the evaluator's network; "small" and "tiny" are the same
recipe with a smaller network and fewer epochs, for fleets of many regions and for tests.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

__all__ = ["ClassifierConfig", "SIZES", "auc", "classifier_auc", "classifier_seeds", "jsd_from_probabilities"]


@dataclass
class ClassifierConfig:
    """The classifier's network and training (defaults: the CaloChallenge evaluator's)."""

    hidden: int = 2048
    layers: int = 3
    epochs: int = 50
    batch_size: int = 1000
    learning_rate: float = 2e-4
    dtype: str = "float64"
    split: tuple[float, float, float] = (0.6, 0.2, 0.2)  # train, test, validation (per class)
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"classifier dtype must be float32 or float64, got {self.dtype!r}")
        if min(self.hidden, self.layers, self.epochs, self.batch_size) < 1:
            raise ValueError("classifier hidden, layers, epochs and batch_size must be at least 1")
        if len(self.split) != 3 or min(self.split) <= 0 or sum(self.split) > 1 + 1e-9:
            raise ValueError(f"classifier split must be 3 positive fractions summing to at most 1, got {self.split}")


#: named sizes: the evaluator's network, and the same recipe smaller for fleets and for tests
SIZES = {
    "official": dict(hidden=2048, layers=3, epochs=50, batch_size=1000, learning_rate=2e-4, dtype="float64"),
    "small": dict(hidden=256, layers=3, epochs=30, batch_size=500, learning_rate=5e-4, dtype="float32"),
    "tiny": dict(hidden=32, layers=2, epochs=12, batch_size=200, learning_rate=2e-3, dtype="float32"),
}


def jsd_from_probabilities(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """(ln 2 − BCE) / ln 2 of calibrated probabilities: the CaloChallenge's JSD estimate, in bits."""
    y = np.asarray(labels, dtype=np.float64)
    p = np.clip(np.asarray(probabilities, dtype=np.float64), 1e-6, 1 - 1e-6)
    bce = -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))
    return float((np.log(2.0) - bce) / np.log(2.0))


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (the Mann-Whitney statistic, ties counted half; equal to
    ``sklearn.metrics.roc_auc_score``)."""
    from scipy.stats import rankdata

    labels = np.asarray(labels).astype(bool)
    ranks = rankdata(scores)
    n1, n0 = labels.sum(), (~labels).sum()
    if n1 == 0 or n0 == 0:
        raise ValueError("AUC needs both classes")
    return float((ranks[labels].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def _network(n_in: int, cfg: ClassifierConfig) -> nn.Sequential:
    layers, width = [], n_in
    for _ in range(cfg.layers):
        layers += [nn.Linear(width, cfg.hidden), nn.LeakyReLU()]  # the evaluator's default slope, 0.01
        width = cfg.hidden
    return nn.Sequential(*layers, nn.Linear(width, 1))


def _checked(x, name: str, dtype) -> np.ndarray:
    with np.errstate(over="ignore"):  # values beyond float32 become inf, refused below by row
        x = np.asarray(x, dtype=dtype)
    if x.ndim != 2:
        raise ValueError(f"classifier input: the {name} features must be (N, F), got shape {x.shape}")
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        raise ValueError(f"classifier input: {int(bad.sum())} of {len(x)} {name} rows hold NaN or inf "
                         f"(or values beyond {np.dtype(dtype).name}), e.g. row {int(np.flatnonzero(bad)[0])}")
    return x


def classifier_auc(x_gen: np.ndarray, x_ref: np.ndarray, cfg: ClassifierConfig | None = None) -> dict:
    """Train a classifier generated (1) vs reference (0) on feature arrays (N, F) and (M, F).

    Returns, on the validation split, ``auc`` and ``jsd`` of the isotonic-calibrated output and
    ``auc_uncalibrated``; ``accuracy_test`` and ``epoch`` (1-based) of the kept epoch, ``n_train``,
    ``n_test``, ``n_val`` and ``seconds``.
    """
    cfg = cfg or ClassifierConfig()
    t0 = time.perf_counter()
    np_dtype = np.float64 if cfg.dtype == "float64" else np.float32
    arrays = [_checked(x_gen, "generated", np_dtype), _checked(x_ref, "reference", np_dtype)]
    if arrays[0].shape[1] != arrays[1].shape[1]:
        raise ValueError(f"classifier input: {arrays[0].shape[1]} generated and {arrays[1].shape[1]} reference features")
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    parts = []
    for x in arrays:
        idx = rng.permutation(len(x))
        a = int(cfg.split[0] * len(x))
        b = a + int(cfg.split[1] * len(x))
        end = b + int(round(cfg.split[2] * len(x))) if sum(cfg.split) < 1 - 1e-9 else len(x)
        parts.append((x[idx[:a]], x[idx[a:b]], x[idx[b:end]]))
    if min(len(p) for part in parts for p in part) < 2:
        raise ValueError(f"classifier input: {len(arrays[0])} generated and {len(arrays[1])} reference showers are "
                         f"too few for a train/test/validation split of {cfg.split}")
    device = torch.device(cfg.device)
    dtype = torch.float64 if cfg.dtype == "float64" else torch.float32

    def join(i):
        x = np.concatenate([parts[0][i], parts[1][i]])
        y = np.concatenate([np.ones(len(parts[0][i])), np.zeros(len(parts[1][i]))])
        return torch.as_tensor(x, dtype=dtype, device=device), torch.as_tensor(y, dtype=dtype, device=device)

    (xtr, ytr), (xte, yte), (xva, yva) = join(0), join(1), join(2)
    net = _network(xtr.shape[1], cfg).to(device=device, dtype=dtype)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.learning_rate)
    loss_fn = nn.BCEWithLogitsLoss()
    generator = torch.Generator().manual_seed(cfg.seed)

    def logits(x):
        with torch.no_grad():
            return torch.cat([net(x[i:i + 10_000]).squeeze(1) for i in range(0, len(x), 10_000)])

    best_acc, best_state, best_epoch = -np.inf, None, 0
    for epoch in range(cfg.epochs):
        net.train()
        perm = torch.randperm(len(xtr), generator=generator).to(device)
        for i in range(0, len(xtr), cfg.batch_size):
            b = perm[i:i + cfg.batch_size]
            opt.zero_grad()
            loss_fn(net(xtr[b]).squeeze(1), ytr[b]).backward()
            opt.step()
        net.eval()
        acc = float(((logits(xte) > 0).to(dtype) == yte).to(torch.float64).mean())  # round(sigmoid), as sklearn
        if acc > best_acc:
            best_acc, best_epoch = acc, epoch + 1
            best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
        if acc == 1.0:
            break
    net.load_state_dict(best_state)
    net.eval()
    p_te = torch.sigmoid(logits(xte)).cpu().numpy().astype(np.float64)
    p_va = torch.sigmoid(logits(xva)).cpu().numpy().astype(np.float64)
    y_te, y_va = yte.cpu().numpy(), yva.cpu().numpy()
    from sklearn.isotonic import IsotonicRegression

    iso = IsotonicRegression(out_of_bounds="clip", y_min=1e-6, y_max=1 - 1e-6).fit(p_te, y_te)
    q_va = iso.predict(p_va)
    return {"auc": auc(y_va, q_va), "jsd": jsd_from_probabilities(y_va, q_va), "auc_uncalibrated": auc(y_va, p_va),
            "accuracy_test": best_acc, "epoch": best_epoch, "n_train": len(xtr), "n_test": len(xte),
            "n_val": len(xva), "seconds": time.perf_counter() - t0}


def classifier_seeds(x_gen: np.ndarray, x_ref: np.ndarray, cfg: ClassifierConfig | None = None, n_seeds: int = 3,
                     progress=None) -> dict:
    """:func:`classifier_auc` with seeds ``cfg.seed``, ``cfg.seed + 1``, ... (``n_seeds`` runs: the
    split, the weights and the batches change): ``auc`` and ``jsd`` are the means over the runs,
    ``auc_std`` and ``jsd_std`` their sample standard deviations (NaN for one run), ``runs`` each
    run's result; ``n_train``, ``n_val`` and ``seconds_per_seed`` (mean). ``progress(text)`` is
    called before each run."""
    cfg = cfg or ClassifierConfig()
    if n_seeds < 1:
        raise ValueError(f"classifier seeds must be at least 1, got {n_seeds}")
    runs = []
    for i in range(n_seeds):
        if progress:
            progress(f"seed {cfg.seed + i} ({i + 1} of {n_seeds})")
        runs.append(classifier_auc(x_gen, x_ref, dataclasses.replace(cfg, seed=cfg.seed + i)))
    out = {}
    for key in ("auc", "jsd"):
        values = np.array([r[key] for r in runs])
        out[key] = float(values.mean())
        out[f"{key}_std"] = float(values.std(ddof=1)) if n_seeds > 1 else float("nan")
    return {**out, "n_seeds": n_seeds, "n_train": runs[0]["n_train"], "n_val": runs[0]["n_val"],
            "seconds_per_seed": float(np.mean([r["seconds"] for r in runs])), "runs": runs}
