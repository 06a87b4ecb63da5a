"""Sizes a config asks for, checked against its dataset and this machine before any work starts.

A ``--set eval.shots=[5, 25]`` on Omniglot's 20 examples per class, or ``meta.ways=5000``, would
otherwise fail (or silently sample with replacement) hours into a run. Each registered dataset
states its sizes without loading anything (``sizes(data_config)``, see ``fedmeta.data.datasets``);
a plugin dataset without it is checked when it loads. The memory check is a lower bound (the
activations of one training or evaluation batch and four copies of the weights): it refuses only
what cannot fit, never what merely might not.
"""

from __future__ import annotations

import os
from itertools import pairwise
from math import prod
from typing import Any

from fedmeta.config.schema import Backdoor, Base, Federated, Membership
from fedmeta.registry import DATASETS

FLOAT_BYTES = 4


def problems(cfg: Base) -> list[str]:
    """Every size in ``cfg`` its dataset or this machine cannot provide, as ``key: why`` lines."""
    sizes_of = getattr(DATASETS.get(cfg.data.dataset).factory, "sizes", None)
    if sizes_of is None:
        return []
    sizes = sizes_of(cfg.data)
    found = _backdoor(cfg, sizes) if isinstance(cfg, Backdoor) else _meta_splits(cfg, sizes)
    return found + _memory(cfg, sizes)


def _meta_splits(cfg: Base, s: Any) -> list[str]:
    """Centralised training, robustness, membership and federated R-MAML (classes split among users)."""
    users = cfg.federation.users if isinstance(cfg, Federated) else 1
    classes = s.train_classes // users
    where = f"the {classes} meta-training classes of each of {users} users" if users > 1 else \
        f"the {classes} meta-training classes"
    found = _training(cfg, classes, s.train_examples, where) + _unlabeled(cfg, s.train_examples)
    found += _evaluation(cfg, s.test_classes, s.test_examples, s.test_examples, "meta-test")
    if isinstance(cfg, Membership):
        most = min(s.train_classes, s.test_classes)
        found += [f"mia.ways: {w} ways exceed the {most} classes of meta-training or meta-test" for w in cfg.mia.ways
                  if w > most]
    return found


def _backdoor(cfg: Backdoor, s: Any) -> list[str]:
    """The backdoor layout: groups of classes per user, held-out queries, reserved classes."""
    att, fed = cfg.attack, cfg.federation
    if not s.groups:
        return [f"data.dataset: '{cfg.data.dataset}' has no classes to reserve for a backdoor"]
    if fed.users > s.groups:
        return [f"federation.users: {fed.users} users, but {cfg.data.dataset} has {s.groups} class groups to share"]
    kept = s.train_examples - fed.holdout
    if kept < 1:
        return [f"federation.holdout: {fed.holdout} held-out examples leave none of {s.train_examples} per class"]
    classes = (s.groups // fed.users) * s.group_size
    found = _training(cfg, classes, kept, f"the {classes} classes of the smallest user's share")
    reserved = att.backdoor_classes + 1
    test_classes = s.test_classes - reserved if s.reserve_from_test else s.test_classes
    named = cfg.data.reserved_classes
    if named and len(named) != reserved:
        found.append(f"data.reserved_classes: {len(named)} names; attack.backdoor_classes = {att.backdoor_classes} "
                     f"backdoor classes and the target need {reserved}")
    if reserved > s.reservable and not named:
        found.append(f"attack.backdoor_classes: {att.backdoor_classes} backdoor classes and the target need {reserved} "
                     f"reserved classes; {cfg.data.dataset} can reserve {s.reservable}")
    found += _evaluation(cfg, test_classes, s.test_examples, s.test_examples, "meta-test")
    found += _evaluation(cfg, classes, kept, fed.holdout, "main-task (held-out queries)")
    fit = min(att.backdoor_classes, cfg.eval.ways - 1)
    if "c" in att.cases and att.case_c_backdoor_ways != "all" and att.case_c_backdoor_ways > fit:
        found.append(f"attack.case_c_backdoor_ways: {att.case_c_backdoor_ways} backdoor classes per episode; "
                     f"{att.backdoor_classes} backdoor classes and {cfg.eval.ways} ways leave room for {fit}")
    for name, held in (("attack.validation_examples", att.validation_examples), ("federation.holdout", fed.holdout)):
        if att.attacker_examples + held >= s.reserved_examples:
            found.append(f"{name}: attack.attacker_examples = {att.attacker_examples} plus {held} held-out examples leave "
                         f"no benign example of a reserved class's {s.reserved_examples}")
    return found


def _training(cfg: Base, classes: int, examples: int, where: str) -> list[str]:
    m = cfg.meta
    found = [f"meta.ways: {m.ways} ways exceed {where}"] if m.ways > classes else []
    per_class = m.shots + (m.queries if m.algorithm != "reptile" else 0)
    if per_class > examples:
        keys = "meta.shots" + (" + meta.queries" if m.algorithm != "reptile" else "")
        found.append(f"{keys}: {per_class} examples per class in a training task; the data has {examples}")
    return found


def _unlabeled(cfg: Base, examples: int) -> list[str]:
    """R-MAML-TRADES draws a task's unlabeled images from its classes, apart from its support and queries."""
    unlabeled = getattr(getattr(cfg, "robust", None), "unlabeled_per_class", 0)
    m = cfg.meta
    if not unlabeled or m.shots + m.queries + unlabeled <= examples:
        return []
    return [(f"robust.unlabeled_per_class: {m.shots} + {m.queries} + {unlabeled} (meta.shots + meta.queries + unlabeled) "
             f"examples per class in a training task; the data has {examples}")]


def _evaluation(cfg: Base, classes: int, support: int, queries: int, what: str) -> list[str]:
    e = cfg.eval
    found = [f"eval.ways: {e.ways} ways exceed the {classes} {what} classes"] if e.ways > classes else []
    if support == queries:  # one pool of examples for both
        if max(e.shots) + e.queries > support:
            found.append(f"eval.shots + eval.queries: {max(e.shots)} + {e.queries} examples per class in a {what} "
                         f"episode; its classes have {support}")
    else:
        if max(e.shots) > support:
            found.append(f"eval.shots: {max(e.shots)} shots per class in a {what} episode; {support} examples are kept")
        if e.queries > queries:
            found.append(f"eval.queries: {e.queries} queries per class in a {what} episode; {queries} are held out")
    return found


def _memory(cfg: Base, s: Any) -> list[str]:
    """Refuse a batch or model that cannot fit in this machine's memory (CPU runs)."""
    if cfg.runtime.device == "cuda":
        return []
    height, width, _ = s.image_shape
    weights = 4 * _parameters(cfg, s.image_shape) * FLOAT_BYTES  # weights, gradients, two Adam moments
    keys, examples = _batch(cfg)
    activations = _activation_bytes(cfg, height * width) * examples
    have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if weights + activations <= have:
        return []
    culprit = ("model.hidden" if cfg.model.architecture == "mlp" else "model.filters") if weights > activations else keys
    need = (weights + activations) / 2**30
    return [f"{culprit}: one step needs at least {need:.0f} GiB; this machine has {have / 2**30:.0f} GiB"]


def _activation_bytes(cfg: Base, pixels: int) -> int:
    """One example's activations in one forward pass (a lower bound: the first block's output)."""
    width = cfg.model.filters if cfg.model.architecture != "mlp" else max(cfg.model.hidden)
    return FLOAT_BYTES * width * (pixels if cfg.model.architecture != "mlp" else 1)


def _parameters(cfg: Base, shape: tuple[int, int, int]) -> int:
    model = cfg.model
    if model.architecture == "mlp":
        widths = [prod(shape), *model.hidden, cfg.meta.ways]
        return sum(a * b for a, b in pairwise(widths))
    return 9 * model.filters * (shape[2] + 3 * model.filters)


def _batch(cfg: Base) -> tuple[str, int]:
    """The largest batch a step runs at once (training or evaluation): its keys and examples."""
    m, e = cfg.meta, cfg.eval
    if m.algorithm == "reptile":
        train = ("meta.inner_batch" + (", meta.meta_batch" if cfg.runtime.batched else ""),
                 m.inner_batch * (m.meta_batch if cfg.runtime.batched else 1))
    else:
        train = ("meta.meta_batch, meta.ways, meta.shots, meta.queries" + (", meta.inner_steps" if m.algorithm == "maml" else ""),
                 m.meta_batch * m.ways * (m.shots + m.queries) * (m.inner_steps if m.algorithm == "maml" else 1))
    evaluation = ("eval.ways, eval.shots" + (", eval.queries" if e.transductive else ""),
                  e.ways * max(e.shots) + (e.ways * e.queries if e.transductive else 1))
    return max(train, evaluation, key=lambda t: t[1])
