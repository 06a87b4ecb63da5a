"""The geometry of a threat-matrix cell's attack round: why a clustering rule keeps what it keeps.

    python benchmarks/round_geometry.py runs/matrix/<cell>

Reads the cell's config, finds its cached attack round(s) (one per kind of rule an adaptive
attacker trains against; the run must have computed them, under the same ``FEDMETA_CACHE``) and
prints, for each: every update's norm; the cosine distances between the low-frequency DCT
components of the updates (FreqFed's features), benign-benign, attacker-attacker and
attacker-benign; and which users FreqFed and FLAME's clustering keep (HDBSCAN's majority cluster).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics.pairwise import cosine_distances

from fedmeta.config import Backdoor, load_config
from fedmeta.data.files import cache_dir
from fedmeta.federation.client import RoundSettings
from fedmeta.federation.freqfed import low_frequencies
from fedmeta.federation.subsets import majority_cluster
from fedmeta.federation.updates import flatten
from fedmeta.models.build import build_model
from fedmeta.registry import DATASETS
from fedmeta.scenario.cache import attack_round_key
from fedmeta.storage import read_tensors


def rounds(cell: Path) -> dict[Path, list[str]]:
    """Each cached attack round of the cell -> the rules whose rows used it."""
    cfg = load_config(str(cell / "config.toml"))
    found: dict[Path, list[str]] = {}
    for rule in cfg.compare.rules:
        row = cfg.model_copy(update={"federation": cfg.federation.model_copy(update={"rule": rule})})
        key = attack_round_key(row, cfg.attack.cases[0], RoundSettings(1, "main"), pretraining=cfg)
        path = cache_dir() / f"attack-{key}.safetensors"
        if path.is_file():
            found.setdefault(path, []).append(rule)
    return found


def parameter_order(cfg: Backdoor) -> list[str]:
    """The model's parameter names in the order the server flattens updates (the cache file keeps
    them sorted by name; FreqFed's DCT depends on the order)."""
    image_shape = DATASETS.get(cfg.data.dataset).factory.sizes(cfg.data).image_shape
    return list(build_model(cfg.model, image_shape, cfg.meta.ways).init(torch.Generator()))


def describe(path: Path, names: list[str], attackers: set[int]) -> None:
    tensors, meta = read_tensors(path)
    users = [h["user"] for h in meta["updates"]]
    stacked = torch.stack([flatten({k: tensors[f"{u}/{k}"] for k in names}) for u in users])
    print("users   ", users)
    print("norms   ", [round(float(n), 3) for n in stacked.norm(dim=1)])
    features = low_frequencies(stacked, 0.5).numpy()
    distances = cosine_distances(features)
    bad = np.array([u in attackers for u in users])
    pairs = lambda a, b: distances[np.ix_(a, b)][~np.eye(len(users), dtype=bool)[np.ix_(a, b)]]  # noqa: E731
    for label, a, b in [("benign-benign", ~bad, ~bad), ("attacker-attacker", bad, bad), ("attacker-benign", bad, ~bad)]:
        values = pairs(a, b)
        if values.size:
            print(f"cosine distance, {label:18} {values.min():.2f}-{values.max():.2f} (mean {values.mean():.2f})")
    print("FreqFed keeps", [u for u, k in zip(users, majority_cluster(features), strict=True) if k])
    print("FLAME keeps  ", [u for u, k in zip(users, majority_cluster(stacked.double().numpy()), strict=True) if k])


def main(cell: Path) -> None:
    cfg = load_config(str(cell / "config.toml"))
    found = rounds(cell)
    if not found:
        sys.exit(f"no cached attack round of {cell} under {cache_dir()}: run the cell first")
    for path, rules in found.items():
        print(f"\n{path.name} (rows: {', '.join(rules)})")
        describe(path, parameter_order(cfg), set(cfg.attack.users))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
