"""Distributed backdoor attack (Xie et al., "DBA: Distributed Backdoor Attacks against Federated
Learning", ICLR 2020)."""

from __future__ import annotations

from fedmeta.attacks.strategies import AttackerContext, BoostedOptions, boosted
from fedmeta.federation.client import MetaClient
from fedmeta.registry import ATTACKS


@ATTACKS.register("dba", options=BoostedOptions, split_trigger=True)
def dba(ctx: AttackerContext, boost: float, episodes: int, inner_epochs: float) -> MetaClient:
    """DBA (Xie et al., ICLR 2020): the trigger split among the colluding attackers, each training with its own part.

    The global trigger is cut into K local triggers, K = the users running ``dba``
    (``Trigger.split``: contiguous runs of its pixels in raster order; a 4 x 4 patch cut in two
    gives two adjacent 2 x 4 stripes, cut in three runs of 6, 5 and 5 pixels that straddle rows;
    the ``dba`` trigger pattern, DBA's reference layout, gives its separated lines); the k-th of
    them in ``attack.attackers`` holds its share of the keyed backdoor images stamped with part k
    only (``scenario.backdoor``,
    ``AttackerContext.backdoor_rows``). Each trains like the paper's attacker on its own part and
    sends its update scaled by ``boost`` (DBA's scale factor gamma). In DBA's reference code every
    poisoning attacker scales by the full n / eta, so that the parts add up in the global model:
    with FedAvg over M_min updates, ``boost = M_min`` (10 in ``omniglot-fleet-*``) gives each part its
    whole weight, where ``boosted``'s lambda = n / f makes f whole-trigger updates replace the model
    together. Attack-train and attack-validation accuracy are measured with the whole trigger,
    as in the paper.
    """
    return boosted(ctx, boost, episodes, inner_epochs)
