"""Fine-pruning as a local defense (registered ``fine-pruning``; Liu, Dolan-Gavitt & Garg, RAID 2018).

A benign user needs nothing from the server for it, so it runs beside fine-tuning alone
(Experiment 2) and the matching network (Experiment 3) in the comparison's local column:

1. *Clean activations*: the user draws ``episodes`` episodes of its own classes, as its
   evaluation episodes are made (the target always in; in case c a backdoor class, correctly
   labelled), with support examples from below each class's evaluation split, and runs each
   support set through the attacked global model as one batch.
2. *Pruning*: the ``fraction`` of channels of the last convolutional layer with the smallest mean
   activation are zeroed (``fedmeta.defenses.pruning``).
3. *Fine-tuning*: the pruned model is fine-tuned on each evaluation episode's support set exactly
   as in Experiment 2 (``local_defenses.finetune``); its step 0 is the pruned model as it is.

Settings: ``[local_defenses.fine-pruning]`` (``fraction``, ``episodes``).
"""

from __future__ import annotations

from pydantic import BaseModel, Field, PositiveInt

from fedmeta.config.schema import DefenseComparison
from fedmeta.config.sections import ALLOW
from fedmeta.data.episodes import gather
from fedmeta.defenses.pruning import channel_activations, dormant_channels, prune
from fedmeta.experiments.backdoor import Case, backdoor_episodes
from fedmeta.experiments.local_defenses import Curves, finetune
from fedmeta.models.conv4 import Params
from fedmeta.registry import LOCAL_DEFENSES
from fedmeta.rng import stream


class FinePruningOptions(BaseModel):
    model_config = ALLOW

    fraction: float = Field(0.5, gt=0.0, lt=1.0)
    """Share of the last convolutional layer's channels pruned, least active first (our choice of
    0.5: the paper prunes until clean accuracy drops by 4%, and Conv4's 64 channels of a 5-way
    few-shot model leave little to measure that drop on)."""
    episodes: PositiveInt = 20
    """Clean episodes of the user's own classes whose support sets give the mean activations."""


@LOCAL_DEFENSES.register("fine-pruning", options=FinePruningOptions)
def fine_pruning(cfg: DefenseComparison, case: Case, attacked: Params, user: int, at: list[int]) -> Curves:
    """Fine-pruning (Liu et al., RAID 2018): prune the channels of the last convolutional layer
    that the user's clean data leaves least active, then fine-tune as Experiment 2 does."""
    options = FinePruningOptions(**cfg.local_defense_options("fine-pruning"))
    ev = case.scenario.evaluation[user]
    clean = backdoor_episodes(cfg, ev, options.episodes, stream(cfg.seed, "fine-pruning", case.name, user))
    images = case.scenario.images
    activations = channel_activations(case.learner.model, attacked, (gather(images, rows) for rows in clean.support))
    return finetune(cfg, case, prune(attacked, dormant_channels(activations, options.fraction)), user, at)
