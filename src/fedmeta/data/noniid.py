"""Non-IID splits of class groups among users: Dirichlet proportions per kind (Omniglot: per alphabet).

The paper deals each user a uniformly random share of the meta-training characters
(``fedmeta.data.splits.partition``): every user sees every alphabet. Federated-learning benchmarks
make users heterogeneous with the label-Dirichlet split of Hsu, Qi & Brown, "Measuring the Effects
of Non-Identical Data Distribution for Federated Visual Classification" (2019): for each label k,
draw p_k ~ Dir_N(alpha) and give user j the fraction p_k[j] of label k's examples. Here the
"labels" are kinds of class groups (an Omniglot character's alphabet) and the "examples" are the
groups (a character with its rotations), so users keep disjoint, whole characters while their
alphabets are skewed: alpha -> 0 gives each alphabet to one user, alpha -> inf the uniform split.
As in NIID-Bench (Li, Diao, Chen & He, "Federated Learning on Non-IID Data Silos: An Experimental
Study", ICDE 2022, ``partition_data``), the draw is repeated until every user holds at least a
minimum number of groups.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

DRAWS = 100
"""Draws tried before a split that leaves some user too few groups is refused."""


def group_kinds(names: Sequence[str], groups: Tensor) -> Tensor:
    """The kind of each group of ``groups.unique()`` (in that order), as integer ids: the class
    name up to its first ``/`` (Omniglot: ``Alphabet/characterNN/rotD`` -> the alphabet; a name
    without ``/`` is a kind of its own)."""
    first = {}
    for c, g in enumerate(groups.tolist()):
        first.setdefault(g, names[c].split("/", 1)[0])
    kinds = [first[g] for g in groups.unique().tolist()]
    ids = {k: i for i, k in enumerate(dict.fromkeys(kinds))}
    return torch.tensor([ids[k] for k in kinds])


def dirichlet_partition(items: Tensor, kinds: Tensor, parts: int, alpha: float, least: int,
                        gen: torch.Generator) -> list[Tensor]:
    """``items`` split into ``parts`` disjoint, sorted groups, each kind's items shared out by
    proportions p ~ Dir(alpha, ..., alpha) over the parts (Hsu et al. 2019); redrawn until every
    part has at least ``least`` items (NIID-Bench), else ``ValueError`` naming
    ``federation.dirichlet_alpha``. The cuts round down; each kind's slices go to the parts in a
    random order, so that no part always loses the remainders."""
    rng = np.random.default_rng(int(torch.randint(2**62, (1,), generator=gen)))
    for _ in range(DRAWS):
        shares: list[list[Tensor]] = [[] for _ in range(parts)]
        for kind in kinds.unique().tolist():
            members = items[kinds == kind]
            members = members[torch.from_numpy(rng.permutation(len(members)))]
            cuts = (np.cumsum(rng.dirichlet(np.full(parts, alpha))) * len(members)).astype(int)[:-1]
            for part, chunk in zip(rng.permutation(parts), np.split(np.arange(len(members)), cuts), strict=True):
                shares[part].append(members[torch.from_numpy(chunk)])
        split = [torch.cat(s).sort().values for s in shares]
        if min(len(s) for s in split) >= least:
            return split
    raise ValueError(f"federation.dirichlet_alpha: no Dirichlet({alpha:g}) split of {len(items)} class groups in {DRAWS} "
                     f"draws gave each of {parts} users at least {least}; raise it, or lower federation.users")
