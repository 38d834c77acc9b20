"""Validating a fleet of registered champions: the composition of the registry (pull by name) with
the validation package (reports and the fleet table, ``validate.fleet``).

:func:`validate_fleet` pulls ``CAMPAIGN.FAMILY.REGION@champion`` for every ``REGION.h5`` of a
reference folder (held-out showers, e.g. a campaign simulated with another seed), generates showers
at the reference's incident energies with ONNX Runtime, writes ``OUT/REGION/`` (``validate.report``)
and the summary ``OUT/summary.md`` and ``OUT/summary.csv`` (``validate.fleet.write_summary``). A
region without a champion, or whose validation failed, fails the thresholds.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from registry.pull import RegistryError, pull, registered_name
from showers.campaign import list_regions
from showers.formats import source_label
from validate.fleet import DEFAULT_THRESHOLDS, parse_threshold, write_summary
from validate.report import ValidateConfig, read_sample, validate_samples

__all__ = ["validate_fleet"]


def validate_fleet(campaign: str, family: str, reference_dir, out_dir, *, regions=None, alias: str = "champion",
                   cfg: ValidateConfig | None = None, thresholds=DEFAULT_THRESHOLDS, uri: str | None = None,
                   offline: bool = False, seed: int = 0, progress=None) -> list[dict]:
    """Validate every region's ``CAMPAIGN.FAMILY.REGION@alias`` against ``reference_dir/REGION.h5``.

    regions: globs selecting regions (default: every file of ``reference_dir``).
    Returns the summary rows (``validate.fleet.write_summary``).
    """
    for text in thresholds:
        parse_threshold(text)
    cfg = cfg or ValidateConfig(classifier="none", per_layer=False)
    out = Path(out_dir)
    rows = []
    names = list_regions(reference_dir, regions)
    for i, region in enumerate(names):
        name = registered_name(campaign, family, region)
        if progress:
            progress(f"[{i + 1}/{len(names)}] {name}@{alias}")
        try:
            gen = pull(f"{name}@{alias}", uri=uri, offline=offline)
            e, ref, readout = read_sample(Path(reference_dir) / f"{region}.h5", max_showers=cfg.max_showers)
            showers = gen.generate(e, seed=seed, allow_extrapolation=True)
            if showers.shape[1] != readout.n_voxels:
                raise ValueError(f"{name} has {showers.shape[1]} voxels, the reference {readout.n_voxels}")
            labels = (source_label(Path(reference_dir) / f"{region}.h5"), f"{name}@{alias}")
            m = validate_samples(e, showers, e, ref, readout, out / region, dataclasses.replace(cfg, labels=labels),
                                 title=f"{name} v{gen.version}",
                                 names=(f"{name}@{alias} (v{gen.version})", f"{region}.h5"))
            rows.append({"region": region, "model": m["generated"], **m["headline"]})
        except (RegistryError, ValueError, OSError) as exc:
            rows.append({"region": region, "model": name, "error": str(exc).splitlines()[0]})
    return write_summary(rows, out, thresholds)
