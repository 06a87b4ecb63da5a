"""The Flower engine: fedmeta's federations on Flower (``pip install 'fedmeta[flower]'``, flwr 1.42).

An adapter, not a second implementation: the ServerApp (``fedmeta.flower_app``) runs the same
experiment function as ``fedmeta run``, with the ``FlowerEngine``, whose servers' client updates
are computed by Flower nodes (``apps.FlowerServer``); each node rebuilds the same clients with the
federation builder and runs its own user's. Schedule, screening and aggregation stay fedmeta's;
the rules whose registration names a Flower strategy (FedAvg, median, trimmed mean, Krum,
Multi-Krum) are computed by it.

- ``simulation.run_simulation``: Flower's simulation engine (Ray), ``fedmeta run CONFIG --engine flower``.
- ``deployment.Loopback``: a real SuperLink and one SuperNode per user on this machine, with TLS
  and SuperNode authentication unless ``--insecure`` (loopback only)
  (``python -m fedmeta.engines.flower.deployment``).
- ``apps.Nodes``/``apps.Operator``: the ServerApp accepts a user's update only from the node that
  holds it, shaped like the model; the server's operator fixes where runs go (``FEDMETA_RUNS``).
- ``federation.secure_aggregation = true``: the updates go through SecAgg+ (``secagg``).

Importing this package turns Flower's telemetry and update check off and keeps it from
installing dependencies at run time (offline machines); this must happen before ``flwr`` is
imported, because Flower reads these variables at import time.
"""

from __future__ import annotations

import os

os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
os.environ["FLWR_DISABLE_UPDATE_CHECK"] = "1"
os.environ["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
os.environ["RAY_DISABLE_USAGE_STATS"] = "1"
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
os.environ.setdefault("FLWR_LOG_LEVEL", "ERROR")
