"""A real Flower deployment on 127.0.0.1: one SuperLink, one SuperNode per user, ``flwr run``.

Every process is a child of this one, started in its own session, and ``Loopback.close`` stops
them (SuperNodes first, then the SuperLink, as Flower wants) and waits until no process of their
sessions is left. Each SuperNode gets ``--node-config partition-id=<user>``, so it trains only its
user's partition. Runtime dependency installation is off: the apps import fedmeta from this
environment, offline.

    python -m fedmeta.engines.flower.deployment CONFIG --out DIR [--set key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

import tomli_w

import fedmeta
from fedmeta.config import Config, load_config

APP_DIR = Path(__file__).with_name("app")
"""The Flower App that ``flwr run`` builds and sends to the SuperLink."""

STATUS_POLL_S = 10.0
"""Between ``flwr ls`` calls while a run is going (a finished ``summary.json`` ends the wait early)."""


class DeploymentError(RuntimeError):
    """The deployment could not start, or the run did not complete."""


class Loopback:
    """SuperLink and SuperNodes on loopback, for ``users`` users; use as a context manager."""

    def __init__(self, users: int, home: Path | None = None, startup_timeout: float = 120.0) -> None:
        self.users, self.startup_timeout = users, startup_timeout
        self._own_home = home is None
        self.home = Path(tempfile.mkdtemp(prefix="fedmeta-flwr-")) if home is None else home
        self.home.mkdir(parents=True, exist_ok=True)
        self.port = _free_port()
        self.processes: list[subprocess.Popen] = []
        self.env = _environment(self.home)

    def __enter__(self) -> Loopback:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def _start(self) -> None:
        (self.home / "config.toml").write_text(tomli_w.dumps({"superlink": {
            "default": "loopback", "loopback": {"address": f"127.0.0.1:{self.port}", "insecure": True}}}))
        logs = self.home / "logs"
        logs.mkdir(exist_ok=True)
        self._spawn("superlink", ["flower-superlink", "--insecure", "--disable-runtime-dependency-installation",
                                  "--host", "127.0.0.1", "--port", str(self.port)])
        self._wait_healthy()
        for user in range(self.users):
            self._spawn(f"supernode-{user}", [
                "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{self.port}",
                "--host", "127.0.0.1", "--port", str(_free_port()),
                "--node-config", f"partition-id={user} num-partitions={self.users}",
            ])

    def _spawn(self, name: str, command: list[str]) -> None:
        log = (self.home / "logs" / f"{name}.log").open("w")
        self.processes.append(subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                               stdin=subprocess.DEVNULL, start_new_session=True))

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.processes[0].poll() is not None:
                raise DeploymentError(f"the SuperLink exited; see {self.home / 'logs' / 'superlink.log'}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=1):
                    return
            except OSError:
                time.sleep(0.2)
        raise DeploymentError(f"the SuperLink did not answer on port {self.port} in {self.startup_timeout:.0f} s")

    def run(self, cfg: Config, out: Path, timeout: float = 3600.0) -> dict[str, Any]:
        """Run the experiment through ``flwr run`` and return the summary the ServerApp wrote."""
        if cfg.federation.users != self.users:
            raise DeploymentError(f"the deployment has {self.users} SuperNodes; the config has {cfg.federation.users} users")
        overrides = self.home / "run-config.toml"
        overrides.write_text(tomli_w.dumps({"config": cfg.to_toml(), "out": str(out.resolve())}))
        summary = out / "summary.json"
        old = _mtime(summary)  # a resumed run's summary from before
        started = self._flwr(["run", str(APP_DIR), "loopback", "--run-config", str(overrides), "--format", "json"])
        run_id, clock = int(started["run-id"]), time.monotonic()
        while (status := self._status(run_id))["status"] not in ("finished:completed", "finished:failed",
                                                                  "finished:stopped"):
            if time.monotonic() > clock + timeout:
                raise DeploymentError(f"run {run_id} did not finish in {timeout:.0f} s")
            _wait_for_change(summary, old, STATUS_POLL_S)
        if status["status"] != "finished:completed":
            raise DeploymentError(f"run {run_id} ended {status['status']}: {status.get('status-details', '')} "
                                  f"(logs: flwr log {run_id} loopback, with FLWR_HOME={self.home})")
        return json.loads(summary.read_text())

    def _status(self, run_id: int) -> dict[str, Any]:
        return self._flwr(["ls", "loopback", "--run-id", str(run_id), "--format", "json"])["runs"][0]

    def _flwr(self, args: list[str]) -> dict[str, Any]:
        done = subprocess.run(["flwr", *args], env=self.env, capture_output=True, text=True, timeout=300)
        try:
            reply = json.loads(done.stdout)
        except json.JSONDecodeError:
            reply = {"success": False, "error-message": done.stdout + done.stderr}
        if done.returncode or not reply.get("success", True):
            raise DeploymentError(f"flwr {' '.join(args[:2])} failed: {reply.get('error-message', done.stderr)}")
        return reply

    def close(self, grace: float = 30.0) -> None:
        """Stop SuperNodes, then the SuperLink; wait until their whole sessions are gone."""
        for group in (self.processes[1:], self.processes[:1]):
            for process in group:
                _signal_session(process.pid, signal.SIGTERM)
            deadline = time.monotonic() + grace
            for process in group:
                try:
                    process.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    _signal_session(process.pid, signal.SIGKILL)
                    process.wait()
        deadline = time.monotonic() + grace
        while any(_session_alive(p.pid) for p in self.processes) and time.monotonic() < deadline:
            time.sleep(0.2)
        for process in self.processes:
            _signal_session(process.pid, signal.SIGKILL)
        self.processes = []
        if self._own_home:
            shutil.rmtree(self.home, ignore_errors=True)


def _environment(home: Path) -> dict[str, str]:
    """This environment for the Flower processes: its Python first on PATH (Flower starts its
    helpers by name), this fedmeta importable, Flower's home in ``home``, nothing fetched online."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    source = str(Path(fedmeta.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in [source, env.get("PYTHONPATH", "")] if p)
    env["FLWR_HOME"] = str(home)
    env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.1")
    return env


def _mtime(path: Path) -> int | None:
    return path.stat().st_mtime_ns if path.exists() else None


def _wait_for_change(path: Path, old: int | None, seconds: float) -> None:
    """Sleep up to ``seconds``, or until ``path`` is newer than ``old`` (the ServerApp writes
    ``summary.json`` last): each ``flwr ls`` starts a Python process that imports Flower, too
    costly to run every second."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and _mtime(path) == old:
        time.sleep(0.2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _signal_session(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)  # the session leader's pid is its process group id
    except ProcessLookupError:
        pass


def _session_alive(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return False
    return True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="a preset name or a TOML file")
    parser.add_argument("--out", type=Path, required=True, help="run folder")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="key=value")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    # A background job ignores SIGINT; make SIGTERM unwind through Loopback.close too.
    signal.signal(signal.SIGTERM, lambda sig, frame: sys.exit(128 + sig))
    clock = time.perf_counter()
    with Loopback(cfg.federation.users) as deployment:
        summary = deployment.run(cfg, args.out)
    print(json.dumps(summary, indent=2))
    print(f"loopback deployment: {time.perf_counter() - clock:.1f} s in all")


if __name__ == "__main__":
    main()
