"""The data layout of the backdoor experiments (paper Sec. 3), for one dataset and one case.

- Meta-training classes are split among the users (whole characters for Omniglot, so that the
  rotations of a character stay with one user; uniformly, or skewed by alphabet with
  ``federation.dirichlet_alpha``); every class holds out ``federation.holdout``
  examples that only serve as queries of main-task evaluation episodes.
- Backdoor and target classes are reserved outside meta-training and meta-testing: drawn from the
  meta-test characters for Omniglot (1200 train / 418 test / 5 reserved), from the 16 validation
  classes for mini-ImageNet (64 / 20 / 2), or named by ``data.reserved_classes`` and taken out of
  the split that held them (the paper's mini-ImageNet pair: 62 / 20 / 2). Their examples are shared out by
  ``attacks.backdoor.share_examples``; keyed copies of the backdoor shares join the image store.
- Benign users always hold the target class (their benign share); in cases b and c they also
  hold the backdoor classes, correctly labelled. In case c the backdoor classes also appear,
  correctly labelled, in benign fine-tuning (evaluation) episodes.

- Malicious users (``attack.attackers``) keep their own classes and all hold the attacker's share
  of the reserved classes (X_T and the keyed X_B): several attackers collude on one backdoor.
  Users of a strategy registered with ``split_trigger`` (DBA) hold their X_B keyed with their own
  part of the trigger only (``Trigger.split``, one part per such user in ``attack.attackers`` order).

Every pool indexes one uint8 image store, so nothing here copies pixels more than once.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from fedmeta.attacks.backdoor import ReservedShares, share_examples
from fedmeta.config import Backdoor
from fedmeta.data.datasets import Reserved, reserve
from fedmeta.data.noniid import dirichlet_partition, group_kinds
from fedmeta.data.pool import ClassPool
from fedmeta.data.splits import holdout_positions, partition
from fedmeta.data.triggers import Trigger, make_trigger
from fedmeta.registry import ATTACKS
from fedmeta.rng import stream


@dataclass(frozen=True)
class EvalPool:
    """Classes of evaluation episodes: support from positions below ``split[c]``, queries above."""

    pool: ClassPool
    split: Tensor
    target: int  # the target's class index in ``pool``
    backdoors: Tensor  # the backdoor classes' indices in ``pool`` (case c), else empty


@dataclass(frozen=True)
class Scenario:
    users: list[ClassPool]  # each user's meta-training data (benign users': with reserved classes)
    attackers: tuple[int, ...]  # the malicious users
    target_rows: Tensor  # X_T: the attacker's benign target images
    attack_rows: Tensor  # X_B: the attacker's keyed backdoor images (the attack-train set)
    validation_rows: Tensor  # keyed held-out backdoor images (the attack-validation set)
    evaluation: list[EvalPool]  # per user: its classes + target (+ backdoors in case c)
    everyone: EvalPool  # all benign users' classes + target (+ backdoors): Experiment 1
    test: ClassPool  # meta-test classes
    trigger: Trigger
    case: str  # "a", "b" or "c": with the config, all a remote process needs to rebuild this scenario
    part_rows: dict[int, Tensor]  # per user of a trigger-splitting strategy (DBA): X_B keyed with its part only

    @property
    def images(self) -> Tensor:
        return self.test.images

    @property
    def benign(self) -> list[int]:
        return [u for u in range(len(self.users)) if u not in self.attackers]

    def to(self, device: torch.device) -> Scenario:
        """The scenario with its one image store on ``device`` (index tables stay on the CPU, as in
        ``ClassPool.to``), so that a run's clients and evaluations compute where its model is."""
        images = self.images.to(device)

        def evaluation(ev: EvalPool) -> EvalPool:
            return replace(ev, pool=ev.pool.rebase(images))

        return replace(self, users=[p.rebase(images) for p in self.users], evaluation=[evaluation(e) for e in self.evaluation],
                       everyone=evaluation(self.everyone), test=self.test.rebase(images))


def build_scenario(cfg: Backdoor, case: str) -> Scenario:
    att, fed = cfg.attack, cfg.federation
    base = reserve(cfg.data, cfg.seed, att.backdoor_classes + 1)
    shares = [
        share_examples(
            int(base.reserved.counts[c]), att.attacker_examples,
            att.validation_examples if c < att.backdoor_classes else fed.holdout,
            att.benign_examples, stream(cfg.seed, "reserved", c),
        )
        for c in range(base.reserved.num_classes)
    ]
    target = att.backdoor_classes
    share_rows = lambda which, classes: torch.cat([base.reserved.rows_of(c)[getattr(shares[c], which)] for c in classes])  # noqa: E731
    backdoor = list(range(att.backdoor_classes))
    clean_attack, clean_validation = share_rows("attacker", backdoor), share_rows("held_out", backdoor)
    trigger = make_trigger(
        att.trigger.pattern, base.train.image_shape, size=att.trigger.size, position=att.trigger.position,
        opacity=att.trigger.opacity, thickness=att.trigger.thickness, gap=att.trigger.gap,
        gen=stream(cfg.seed if att.trigger.seed is None else att.trigger.seed, "trigger"),
    )
    store = base.train.images
    splitting = [a.user for a in att.attackers if ATTACKS.get(a.strategy).info.get("split_trigger")]
    parts = [p.apply(store[clean_attack]) for p in (trigger.split(len(splitting)) if splitting else [])]
    keyed = len(store) + len(clean_attack) + len(clean_validation)
    images = torch.cat([store, trigger.apply(store[torch.cat([clean_attack, clean_validation])]), *parts])
    base = base.rebase(images)
    attack_rows = torch.arange(len(store), len(store) + len(clean_attack))
    validation_rows = torch.arange(len(store) + len(clean_attack), keyed)
    part_rows = {u: keyed + i * len(clean_attack) + torch.arange(len(clean_attack)) for i, u in enumerate(splitting)}

    per_class = int(base.train.counts.min())
    kept, held = holdout_positions(base.train.num_classes, per_class, fed.holdout, stream(cfg.seed, "holdout"))
    train = base.train.examples(torch.cat([kept, held], dim=1))  # each row: [kept | held out]
    owners = _owners(cfg, base)
    user_classes = [torch.nonzero(torch.isin(base.groups, g)).flatten() for g in owners]
    benign_share = base.reserved.examples_at([s.benign for s in shares])
    carried = benign_share.classes([target] if case == "a" else [*backdoor, target])
    own = [train.classes(c).examples(torch.arange(kept.shape[1])) for c in user_classes]
    users = [pool if u in att.users else pool.merge(carried) for u, pool in enumerate(own)]

    def evaluation(classes: Tensor) -> EvalPool:
        return _eval_pool(train.classes(classes), kept.shape[1], base.reserved, shares, target, case == "c")

    benign_classes = torch.cat([c for u, c in enumerate(user_classes) if u not in att.users])
    return Scenario(
        users, att.users, share_rows("attacker", [target]), attack_rows, validation_rows,
        [evaluation(c) for c in user_classes], evaluation(benign_classes), base.test, trigger, case, part_rows,
    )


def _owners(cfg: Backdoor, base: Reserved) -> list[Tensor]:
    """Each user's class groups: a uniformly random share (the paper's), or, with
    ``federation.dirichlet_alpha``, each kind's (alphabet's) groups by Dirichlet proportions, every
    user with enough groups for an episode of ``max(meta.ways, eval.ways)`` classes."""
    fed, groups, gen = cfg.federation, base.groups.unique(), stream(cfg.seed, "users")
    if fed.dirichlet_alpha is None:
        return partition(groups, fed.users, gen)
    least = -(-max(cfg.meta.ways, cfg.eval.ways) * len(groups) // len(base.groups))  # ceil(ways / classes per group)
    return dirichlet_partition(groups, group_kinds(base.train.names, base.groups), fed.users, fed.dirichlet_alpha, least, gen)


def _eval_pool(
    train: ClassPool, kept: int, reserved: ClassPool, shares: list[ReservedShares], target: int, with_backdoors: bool
) -> EvalPool:
    """Meta-training classes ([kept | held out], split at ``kept``), then the target ([benign |
    held out]), then, in case c, the backdoor classes (their benign share cut in two halves)."""
    extra = [target] + (list(range(target)) if with_backdoors else [])
    positions = [torch.cat([shares[c].benign, shares[c].held_out]) if c == target else shares[c].benign for c in extra]
    splits = [len(shares[c].benign) if c == target else len(shares[c].benign) // 2 for c in extra]
    pool = train.merge(reserved.classes(extra).examples_at(positions))
    split = torch.cat([torch.full((train.num_classes,), kept), torch.tensor(splits)])
    backdoors = torch.arange(train.num_classes + 1, pool.num_classes)
    return EvalPool(pool, split, train.num_classes, backdoors)
