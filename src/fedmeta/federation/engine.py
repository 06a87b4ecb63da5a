"""Engines: where a federation's clients compute their updates.

An engine is passed down from the command line to the experiment and from there to the builder
(``fedmeta.scenario.builder.build_server``), never looked up globally. It turns the in-process
``Server`` of one federation into the server that runs it: ``InProcess`` keeps it as it is;
the Flower engine (``fedmeta.engines.flower``) sends each round's work to Flower nodes, with the
same schedule, screening and rule. An engine says which experiments it can run, so an experiment
that cannot use it is refused before any work starts.
"""

from __future__ import annotations

from typing import Any, Protocol

from fedmeta.federation.server import Server


class Engine(Protocol):
    name: str
    local: bool
    """Whether clients compute in this process (their updates can then be cached and reused)."""

    def serve(self, server: Server, cfg: Any, phase: Any, rule: str) -> Server:
        """The server that runs ``server``'s federation (``phase``: which one of the run; ``rule``:
        the registered name of its rule)."""
        ...


class InProcess:
    """Every client computes its update in this process, one after another."""

    name = "in-process"
    local = True

    def serve(self, server: Server, cfg: Any, phase: Any, rule: str) -> Server:
        return server


IN_PROCESS = InProcess()
