"""Validating a fleet of registered champions: the composition of the registry (pull by name) with
the validation package (reports and the fleet table, ``validate.fleet``).

:func:`validate_fleet` pulls ``CAMPAIGN.REGION@champion`` (whatever its family; ``CAMPAIGN.FAMILY.REGION``
in a store of the former naming) for every ``REGION.h5`` of a reference folder (held-out showers, e.g. a campaign simulated with another seed), generates showers
at the reference's incident energies with ONNX Runtime, writes ``OUT/REGION/`` (``validate.report``)
and the summary ``OUT/summary.md`` and ``OUT/summary.csv`` (``validate.fleet.write_summary``). A
region without a champion, or whose validation failed, fails the thresholds.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from registry.publish import attach_validation
from registry.pull import RegistryError, pull, registered_name
from showers.campaign import list_regions
from showers.formats import source_label
from validate.fleet import DEFAULT_THRESHOLDS, parse_threshold, write_summary
from validate.report import ValidateConfig, read_sample, validate_samples

__all__ = ["validate_fleet"]


def validate_fleet(campaign: str, reference_dir, out_dir, *, regions=None, alias: str = "champion",
                   cfg: ValidateConfig | None = None, thresholds=DEFAULT_THRESHOLDS, uri: str | None = None,
                   offline: bool = False, seed: int = 0, progress=None, family: str | None = None,
                   attach: bool = False) -> list[dict]:
    """Validate every region's ``CAMPAIGN.REGION@alias`` against ``reference_dir/REGION.h5``.

    regions: globs selecting regions (default: every file of ``reference_dir``).
    family: read a store of the former naming, ``CAMPAIGN.FAMILY.REGION``.
    attach: add each region's figures to the version validated (``registry.publish.attach_validation``),
        beside the floor: the reference's two halves against each other, with the same configuration.
    Returns the summary rows (``validate.fleet.write_summary``), each with the pulled model's ``name``,
    ``version``, ``family`` and ``variant``.
    """
    for text in thresholds:
        parse_threshold(text)
    cfg = cfg or ValidateConfig(classifier="none", per_layer=False)
    out = Path(out_dir)
    rows = []
    names = list_regions(reference_dir, regions)
    for i, region in enumerate(names):
        name = registered_name(campaign, region) if family is None else f"{campaign}.{family}.{region}"
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
                                 names=(f"{name}@{alias} (v{gen.version}, {gen.metadata.get('model')})", f"{region}.h5"))
            rows.append({"region": region, "model": m["generated"], "name": name, "version": gen.version,
                         "family": gen.metadata.get("family"), "variant": gen.metadata.get("model"), **m["headline"]})
            if attach:
                half = np.arange(len(e)) % 2 == 1
                floor = validate_samples(e[~half], ref[~half], e[half], ref[half], readout, out / region / "floor",
                                         dataclasses.replace(cfg, plots=False), title=f"{region}.h5 halves")["headline"]
                attach_validation(name, gen.version, m["headline"], floor=floor, uri=uri,
                                  reference=f"{len(e)} showers of {Path(reference_dir) / f'{region}.h5'}; the floor: "
                                            "its two halves against each other, half the showers each")
        except (RegistryError, ValueError, OSError) as exc:
            rows.append({"region": region, "model": name, "error": str(exc).splitlines()[0]})
    return write_summary(rows, out, thresholds)
