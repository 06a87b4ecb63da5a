"""The batched-users engine: a round's Reptile users as one computation on this process's device.

The users of a round are independent (same global weights, fresh optimiser state, their own
random streams), so their inner loops can run side by side in one ``vmap``: every kernel is
launched once for all of them instead of once per user. A small Conv4 step is launch-bound on a
GPU (28x28 and 84x84 steps cost the same there: README, "On a GPU"), which is where this pays; on
a CPU the per-user loop (``--engine local``) or worker processes (``--engine pool``) are faster.

The server is the in-process one: schedule, screening, arrival order and rule are
``Server.aggregate``'s. Users of one learner and length (the benign users) are batched
(``federation.client.update_together``); any other client (an attacker's strategy, a client
of another learner) computes its update as usual. The updates come back in the sequential
server's order and equal its own up to float round-off (tested).
"""

from __future__ import annotations

import dataclasses

from fedmeta.federation.client import MetaClient, RoundSettings, batchable, update_together
from fedmeta.federation.server import Server
from fedmeta.federation.updates import ClientUpdate
from fedmeta.models.conv4 import Params


@dataclasses.dataclass(frozen=True)
class BatchedServer(Server):
    """``Server`` whose batchable clients of a round compute their updates together."""

    def compute(self, users: list[int], params: Params, settings: RoundSettings) -> list[ClientUpdate]:
        groups: dict[tuple, list[int]] = {}
        for u in users:
            client = self.clients[u]
            alone = not isinstance(client, MetaClient)
            key = ("alone", u) if alone else (id(client.learner), id(client.images), client.steps)
            groups.setdefault(key, []).append(u)
        done: dict[int, ClientUpdate] = {}
        for group in groups.values():
            clients = [self.clients[u] for u in group]
            if len(group) > 1 and batchable(clients):
                done |= dict(zip(group, update_together(clients, params, settings), strict=True))
            else:
                done |= {u: self.clients[u].update(params, settings) for u in group}
        return [done[u] for u in users]


class BatchedUsers:
    """A round's users of one Reptile learner in one batched computation (for GPUs)."""

    name = "batched-users"
    local = True

    def serve(self, server: Server, cfg: object, phase: object, rule: str) -> Server:
        return BatchedServer(**{f.name: getattr(server, f.name) for f in dataclasses.fields(Server)})
