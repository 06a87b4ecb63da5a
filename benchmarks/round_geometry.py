"""The geometry of a threat-matrix cell's attack round: why a clustering rule keeps what it keeps.

    python benchmarks/round_geometry.py runs/matrix/<cell>

Reads the cell's config, finds its cached attack round(s) (one per kind of rule an adaptive
attacker trains against; the run must have computed them, under the same ``FEDMETA_CACHE``) and
prints, for each: every update's norm; the cosine distances between the low-frequency DCT
components of the updates, benign-benign, attacker-attacker and attacker-benign; which users
HDBSCAN's majority cluster keeps for FreqFed in each of its variants (``cluster`` = updates or
the local models G + delta_i, ``transform`` = flat or layers) and for FLAME's clustering (updates,
models); and FoolsGold's weights in the round, its histories then being the round's updates
(``features`` = all or head). G is the cached pre-trained model the round starts from.
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
from fedmeta.federation.foolsgold import foolsgold_weights, head_slice
from fedmeta.federation.freqfed import layer_low_frequencies, low_frequencies
from fedmeta.federation.subsets import local_models, majority_cluster
from fedmeta.federation.updates import flatten
from fedmeta.models.build import build_model
from fedmeta.registry import DATASETS
from fedmeta.scenario.cache import attack_round_key, pretrain_key
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


def layout(cfg: Backdoor) -> dict[str, tuple[int, ...]]:
    """The model's parameter shapes in the order the server flattens updates (the cache file keeps
    them sorted by name; FreqFed's DCT depends on the order)."""
    image_shape = DATASETS.get(cfg.data.dataset).factory.sizes(cfg.data).image_shape
    init = build_model(cfg.model, image_shape, cfg.meta.ways).init(torch.Generator())
    return {k: tuple(v.shape) for k, v in init.items()}


def global_model(cfg: Backdoor, names: list[str]) -> torch.Tensor:
    """The flat pre-trained model G that the attack round starts from (cached by the run)."""
    path = cache_dir() / f"pretrain-{pretrain_key(cfg, cfg.attack.cases[0])}.safetensors"
    if not path.is_file():
        sys.exit(f"no cached pre-training {path.name} under {cache_dir()}: run the cell first")
    tensors, _ = read_tensors(path)
    return flatten({k: tensors[f"params.{k}"] for k in names})


def describe(path: Path, shapes: dict[str, tuple[int, ...]], model: torch.Tensor, attackers: set[int]) -> None:
    tensors, meta = read_tensors(path)
    users = [h["user"] for h in meta["updates"]]
    stacked = torch.stack([flatten({k: tensors[f"{u}/{k}"] for k in shapes}) for u in users])
    print("users   ", users)
    print("norms   ", [round(float(n), 3) for n in stacked.norm(dim=1)])
    distances = cosine_distances(low_frequencies(stacked, 0.5).numpy())
    bad = np.array([u in attackers for u in users])
    pairs = lambda a, b: distances[np.ix_(a, b)][~np.eye(len(users), dtype=bool)[np.ix_(a, b)]]  # noqa: E731
    for label, a, b in [("benign-benign", ~bad, ~bad), ("attacker-attacker", bad, bad), ("attacker-benign", bad, ~bad)]:
        values = pairs(a, b)
        if values.size:
            print(f"cosine distance, {label:18} {values.min():.2f}-{values.max():.2f} (mean {values.mean():.2f})")
    kept = lambda features: [u for u, k in zip(users, majority_cluster(features), strict=True) if k]  # noqa: E731
    for cluster, points in (("updates", stacked.double()), ("models", local_models(stacked, model, "freqfed"))):
        for transform, features in (("flat", low_frequencies(points, 0.5)),
                                    ("layers", layer_low_frequencies(points, list(shapes.values()), 0.5))):
            print(f"FreqFed ({cluster}, {transform}) keeps", kept(features.numpy()))
        print(f"FLAME ({cluster}) keeps", kept(points.numpy()))
    for features, seen in (("all", slice(None)), ("head", head_slice(list(shapes.values())))):
        weights = foolsgold_weights(stacked[:, seen].double())
        print(f"FoolsGold ({features}) weights", [round(float(w), 2) for w in weights])


def main(cell: Path) -> None:
    cfg = load_config(str(cell / "config.toml"))
    found = rounds(cell)
    if not found:
        sys.exit(f"no cached attack round of {cell} under {cache_dir()}: run the cell first")
    shapes = layout(cfg)
    model = global_model(cfg, list(shapes))
    for path, rules in found.items():
        print(f"\n{path.name} (rows: {', '.join(rules)})")
        describe(path, shapes, model, set(cfg.attack.users))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
