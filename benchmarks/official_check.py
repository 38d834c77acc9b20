"""The report's CaloChallenge figures against the official evaluator's, on the same files.

Runs the official ``code/evaluate.py`` of CaloChallenge/homepage (from a fetched mirror: a bare git
repository, ``--mirror``) and ``validate.report`` on the same pairs of files, the same number of
classifier runs, and prints both side by side: the cls-low and cls-high AUC and JSD (mean ± std over
the runs), the separation powers of the evaluator's histograms (its ``hist`` mode: E_tot/E_inc, each
layer's energy, centres and widths, the voxel spectrum) and FPD/KPD.

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 .venv/bin/python benchmarks/official_check.py \
        --data ../shared/g4showers/pbwo4_electrons_main.h5 --out out/official_check

The pairs (``--pairs``), each ``--n`` showers a side with the file's energy mix:

- ``geant4``: the Geant4 file split in two halves (stratified by energy, seeded), one against the other;
- ``generated``: showers generated at the first half's energies (``--generator``: ``simulator``, the
  built-in GFLASH-like simulator; a checkpoint ``.pt``; or a CaloChallenge file, from which showers at
  those energies are taken) against the second half.

What is patched in the official code, at run time in a temporary copy (nothing else): LaTeX off
(``usetex``); ``ttv_split`` by the fractions 0.6 / 0.2 / 0.2 (its fixed dataset-2 counts, 60k / 20k /
20k, need 100k showers a side); the binning XML: the official code runs in dataset-2 mode on an XML of
the PbWO4 readout (45 layers, 16 angular bins, radial edges every 5 mm where dataset 2 has 4.65 mm),
so that both compute the centres from the same geometry. The files are written in float64: the
evaluator sets torch's default dtype to float64 and feeds the arrays it reads to its network as they
are, which a float32 file stops with a dtype mismatch. Its runs are not seeded (numpy's and torch's
global state, as it is); ours take seeds 0, 1, 2.

FPD and KPD: the official code calls JetNet (``jetnet.evaluation.fpd(min_samples=10000)``,
``kpd(batch_size=10000)``), which does not install into this project's environment (it pins numpy
below 2); both columns are therefore ``validate.distances``: JetNet's parameters (batches drawn with
replacement at 10 000-50 000 whatever the sample size: ``cap_to_sample=False``, JetNet's random
draws) against the report's (batches capped at the sample sizes).

Cost (one thread, 1000 against 1000 showers): the official network is about 8 min of CPU per
cls-low run and 4 min per cls-high run, the same for ours, so about 75 min per pair with 3 runs each,
plus a few minutes for the official ``hist`` mode's 200-odd plots. ``--only official`` and ``--only
ours`` run one side each (in two processes), ``--merge`` then prints the table of their JSON files:

    for side in official ours; do .venv/bin/python benchmarks/official_check.py --data G4.h5 --only $side \
        --out out/official_check/$side & done; wait
    .venv/bin/python benchmarks/official_check.py --data G4.h5 --out out/official_check \
        --merge out/official_check/official/official_check.json out/official_check/ours/official_check.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from showers.formats import read_calochallenge, write_calochallenge
from showers.readout import get_readout
from validate import official
from validate.distances import fpd, kpd
from validate.report import ValidateConfig, validate_samples

FILES = ("evaluate.py", "HighLevelFeatures.py", "XMLHandler.py", "evaluate_plotting_helper.py", "resnet.py")
# the official histogram file's names of our features
OFFICIAL_NAMES = {"E layer": "e_layer", "EC Eta layer": "centre_x", "EC Phi layer": "centre_y",
                  "Width Eta layer": "width_x", "Width Phi layer": "width_y"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="the Geant4 file (CaloChallenge format, 6480 voxels)")
    ap.add_argument("--readout", default="g4-pbwo4")
    ap.add_argument("--mirror", default="/work/.mirror/CaloChallenge+homepage/repo",
                    help="a git repository (bare or not) of CaloChallenge/homepage")
    ap.add_argument("--generator", default="simulator", help="simulator, a checkpoint .pt or a CaloChallenge file")
    ap.add_argument("--pairs", default="geant4,generated")
    ap.add_argument("--n", type=int, default=1000, help="showers a side")
    ap.add_argument("--seeds", type=int, default=3, help="classifier runs of each implementation")
    ap.add_argument("--epochs", type=int, default=50, help="classifier epochs (50: the official)")
    ap.add_argument("--only", choices=["official", "ours"], default=None,
                    help="Run one side only (two processes, one for each, then --merge their JSON files).")
    ap.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                    help="Print the table of these official_check.json files (one side each) and stop.")
    ap.add_argument("--out", default="out/official_check")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.merge:
        results = {}
        for path in args.merge:
            for pair, r in json.loads(Path(path).read_text()).items():
                results.setdefault(pair, {}).update(r)
        return write_tables(results, out)
    readout = get_readout(args.readout)
    energy, showers = read_calochallenge(args.data, readout=readout)
    a, b = halves(energy, args.n, seed=20)
    results = {}
    with tempfile.TemporaryDirectory(prefix="official-check-") as tmp:
        code = official_code(args.mirror, Path(tmp) / "code", readout)
        for pair in args.pairs.split(","):
            if pair == "geant4":
                gen_e, gen_x, label = energy[a], showers[a], "Geant4 half A"
            elif pair == "generated":
                gen_e, gen_x, label = energy[a], generate(args.generator, energy[a], readout, args.data), args.generator
            else:
                raise SystemExit(f"--pairs: unknown pair {pair!r} (geant4, generated)")
            ref_e, ref_x = energy[b], showers[b]
            print(f"\n## {label} against Geant4 half B ({len(gen_e)} against {len(ref_e)} showers)", flush=True)
            work = Path(tmp) / pair
            work.mkdir()
            write_calochallenge(work / "input.h5", gen_e, gen_x, dtype=np.float64)
            write_calochallenge(work / "reference.h5", ref_e, ref_x, dtype=np.float64)
            results[pair] = {"label": label, "n": [len(gen_e), len(ref_e)]}
            if args.only in (None, "official"):
                results[pair]["official"] = run_official(code, work, args.seeds, args.epochs)
            if args.only in (None, "ours"):
                results[pair]["ours"] = run_ours(gen_e, gen_x, ref_e, ref_x, readout, work, args.seeds, args.epochs)
            (out / "official_check.json").write_text(json.dumps(results, indent=1, default=float))
    if args.only is None:
        write_tables(results, out)


def write_tables(results: dict, out: Path) -> None:
    """Both sides of every pair side by side: printed and in ``out/official_check.md``."""
    text = ["# The report against the official evaluator", ""]
    for pair, r in results.items():
        text += [f"## {r['label']} against Geant4 half B ({r['n'][0]} against {r['n'][1]} showers)", "", *table(r), ""]
    (out / "official_check.md").write_text("\n".join(text))
    print("\n".join(text) + f"\n{out / 'official_check.md'}")


def halves(energy: np.ndarray, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two disjoint index sets of ``n`` showers each (at most half the file), stratified by energy."""
    rng = np.random.default_rng(seed)
    a, b = [], []
    for e in np.unique(energy):
        idx = rng.permutation(np.flatnonzero(energy == e))
        a.append(idx[: len(idx) // 2]), b.append(idx[len(idx) // 2: 2 * (len(idx) // 2)])
    a, b = np.concatenate(a), np.concatenate(b)
    keep = np.sort(rng.permutation(len(a))[: min(n, len(a))])  # the same positions: the same energy mix
    return np.sort(a[keep]), np.sort(b[keep])


def generate(generator: str, energy: np.ndarray, readout, data: str) -> np.ndarray:
    """Showers at ``energy`` from the built-in simulator, a checkpoint or a file."""
    if generator == "simulator":
        from showers.simulator import ShowerSimulator

        return ShowerSimulator(readout, "PbWO4", "e-").simulate(energy, seed=7)
    if generator.endswith(".pt"):
        import torch

        from zoo import model_from_checkpoint
        from zoo.checkpoint import load_checkpoint

        model = model_from_checkpoint(load_checkpoint(generator))
        model.eval()
        with torch.no_grad():
            return model.sample(energy, generator=torch.Generator().manual_seed(7)).numpy()
    e, x = read_calochallenge(generator, readout=readout)
    out = np.empty((len(energy), x.shape[1]), x.dtype)
    for value in np.unique(energy):
        pos, idx = np.flatnonzero(energy == value), np.flatnonzero(np.isclose(e, value))
        if len(idx) < len(pos):
            raise SystemExit(f"{generator}: {len(idx)} showers at {value / 1000:g} GeV, {len(pos)} needed")
        out[pos] = x[idx[: len(pos)]]
    return out


def official_code(mirror: str, dest: Path, readout) -> Path:
    """The official evaluator's files from ``mirror``'s HEAD in ``dest``, patched (see the module
    docstring), with a dataset-2 binning XML of ``readout``."""
    dest.mkdir(parents=True)
    for name in FILES:
        text = subprocess.run(["git", "-C", mirror, "show", f"HEAD:code/{name}"], check=True, capture_output=True,
                              text=True).stdout
        if name == "evaluate.py":
            for old, new in (("plt.rc('text', usetex=True)", "plt.rc('text', usetex=False)"),
                             ("train_data, test_data, val_data = ttv_split(source_array, reference_array,\n"
                              "                                                    dataset=args.dataset)",
                              "train_data, test_data, val_data = ttv_split(source_array, reference_array)")):
                if old not in text:
                    raise SystemExit(f"{mirror}: evaluate.py has changed, cannot patch {old[:40]!r}")
                text = text.replace(old, new)
        (dest / name).write_text(text)
    layers = "\n".join(f'      <Layer id="{i}" r_edges="{",".join(f"{r:g}" for r in layer.r_edges)}" '
                       f'n_bin_alpha="{layer.n_alpha}" />' for i, layer in enumerate(readout.layers))
    (dest / "binning_dataset_2.xml").write_text(f'<Bins>\n   <Bin pid="11" name="electron">\n{layers}\n   </Bin>\n</Bins>\n')
    return dest


def run_official(code: Path, work: Path, seeds: int, epochs: int) -> dict:
    """The official evaluator's cls-low and cls-high (``seeds`` runs each) and hist mode on
    ``work/input.h5`` against ``work/reference.h5``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "MPLBACKEND": "Agg"}
    res = {"classifier": {}}

    def run(mode: str, out_dir: Path) -> float:
        t0 = time.perf_counter()
        cmd = [sys.executable, "evaluate.py", "-i", str(work / "input.h5"), "-r", str(work / "reference.h5"),
               "-m", mode, "-d", "2", "--output_dir", str(out_dir), "--no_cuda", "--cls_n_epochs", str(epochs)]
        p = subprocess.run(cmd, cwd=code, env=env, capture_output=True, text=True)
        if p.returncode:
            raise SystemExit(f"official evaluate.py -m {mode} failed:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
        return time.perf_counter() - t0

    for mode in ("cls-low", "cls-high"):
        runs = []
        for i in range(seeds):
            out_dir = work / f"official-{mode}-{i}"
            seconds = run(mode, out_dir)
            text = (out_dir / f"classifier_{mode}_2.txt").read_text()
            auc, jsd = map(float, re.findall(r"AUC / JSD\):\n([-0-9.]+) / ([-0-9.]+)", text)[-1])
            runs.append({"auc": auc, "jsd": jsd, "seconds": seconds})
            print(f"  official {mode} run {i + 1}: AUC {auc:.4f} JSD {jsd:.4f} ({seconds:.0f} s)", flush=True)
        res["classifier"][mode] = _mean_std(runs)
    seconds = run("hist", work / "official-hist")
    res["hist_seconds"] = seconds
    res["sep"] = parse_hist((work / "official-hist" / "histogram_chi2_2.txt").read_text())
    return res


def parse_hist(text: str) -> dict:
    """{(feature, layer): separation power} of the official histogram file."""
    out = {}
    for name, value in re.findall(r"^(.+?): \n([-0-9.eE+naif]+)$", text, flags=re.M):
        if name == "Etot / Einc":
            out["etot_einc", None] = float(value)
        elif name == "Voxel distribution":
            out["voxel_energy", None] = float(value)
        else:
            what, layer = name.rsplit(" ", 1)
            out[OFFICIAL_NAMES[what], int(layer)] = float(value)
    return {f"{f}|{'' if layer is None else layer}": v for (f, layer), v in out.items()}


def run_ours(gen_e, gen_x, ref_e, ref_x, readout, work: Path, seeds: int, epochs: int) -> dict:
    """The report (official classifier size, ``seeds`` seeds, no floor) and both FPD/KPD variants."""
    t0 = time.perf_counter()
    cfg = ValidateConfig(classifier="official", classifier_epochs=epochs, seeds=seeds, floor=False, plots=False,
                         per_layer=False)
    m = validate_samples(gen_e, gen_x, ref_e, ref_x, readout, work / "ours", cfg,
                         progress=lambda s: print(f"  ours [{time.perf_counter() - t0:6.0f} s] {s}", flush=True))
    res = {"classifier": {f"cls-{k}": {"auc": c["auc"], "auc_std": c["auc_std"], "jsd": c["jsd"], "jsd_std": c["jsd_std"],
                                       "runs": c["runs"], "seconds": c["seconds_per_seed"]}
                          for k, c in m["classifier"].items()},
           "sep": {f"{r['feature']}|{'' if r['layer'] is None else r['layer']}": r["sep_power"]
                   for r in m["evaluator"]["histograms"]},
           "fpd": {"value": m["fpd"]["value"], "error": m["fpd"]["error"]},
           "kpd": {"value": m["kpd"]["value"], "error": m["kpd"]["error"]}}
    threshold = official.min_energy("2")
    hl = [official.high_level_input(official.evaluator_features(official.apply_threshold(x, threshold), e, readout))
          for e, x in ((gen_e, gen_x), (ref_e, ref_x))]
    f = fpd(hl[1], hl[0], min_samples=10_000, cap_to_sample=False)
    k = kpd(hl[1], hl[0], batch_size=10_000, cap_to_sample=False)
    res["fpd_jetnet"], res["kpd_jetnet"] = {"value": f.value, "error": f.error}, {"value": k.value, "error": k.error}
    return res


def _mean_std(runs: list[dict]) -> dict:
    out = {"runs": runs, "seconds": float(np.mean([r["seconds"] for r in runs]))}
    for key in ("auc", "jsd"):
        v = np.array([r[key] for r in runs])
        out[key], out[f"{key}_std"] = float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else float("nan")
    return out


def _sep(v: float) -> str:
    return f"{v:.4f}" if v >= 1e-3 else f"{v:.2g}"


def _summary(sep: dict, feature: str) -> str:
    vals = {k: v for k, v in sep.items() if k.startswith(feature + "|")}
    if len(vals) == 1:
        return _sep(next(iter(vals.values())))
    worst = max(vals, key=vals.get)
    return f"{_sep(np.mean(list(vals.values())))} / {_sep(vals[worst])} ({worst.split('|')[1]})"


def table(r: dict) -> list[str]:
    o, u = r["official"], r["ours"]
    lines = ["| figure | official evaluate.py | calozoo validate.report |", "|---|---|---|"]
    for mode in ("cls-low", "cls-high"):
        a, b = o["classifier"][mode], u["classifier"][mode]
        n = len(a["runs"])
        for key in ("auc", "jsd"):
            lines.append(f"| {mode} {key.upper()}, mean ± std of {n} runs | {a[key]:.4f} ± {a[key + '_std']:.4f} | "
                         f"{b[key]:.4f} ± {b[key + '_std']:.4f} |")
        lines.append(f"| {mode} seconds per run (1 thread) | {a['seconds']:.0f} | {b['seconds']:.0f} |")
    for feature, what in (("etot_einc", "E_tot/E_inc"), ("e_layer", "E layer: mean / max (layer)"),
                          ("centre_x", "EC Eta"), ("centre_y", "EC Phi"), ("width_x", "Width Eta"),
                          ("width_y", "Width Phi"), ("voxel_energy", "voxel spectrum")):
        lines.append(f"| separation power, {what} | {_summary(o['sep'], feature)} | {_summary(u['sep'], feature)} |")
    shared = sorted(set(o["sep"]) & set(u["sep"]))
    diff = max(abs(o["sep"][k] - u["sep"][k]) for k in shared)
    lines.append(f"| largest difference of the {len(shared)} separation powers | {diff:.2g} | |")
    for name in ("fpd", "kpd"):
        j, c = u[f"{name}_jetnet"], u[name]
        lines.append(f"| {name.upper()} ×10³: JetNet's parameters (validate.distances) / the report's | "
                     f"{1e3 * j['value']:.4g} ± {1e3 * j['error']:.2g} | {1e3 * c['value']:.4g} ± {1e3 * c['error']:.2g} |")
    return lines


if __name__ == "__main__":
    main()
