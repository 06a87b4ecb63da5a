"""A real Flower deployment on one machine: one SuperLink, one SuperNode per user, ``flwr run``.

Secured by default, as a deployment across machines must be: the SuperLink serves TLS with a
certificate signed by a CA made for the deployment (``write_certificates``), and only SuperNodes
whose public key was registered with ``flwr supernode register`` may connect (Flower's
``--enable-supernode-auth``; each node signs its requests with its private key, ``write_node_key``).
The deployment registers one key per user and tells the ServerApp which node holds which user
(``apps.NODES_ENV``), so a node claiming another user's partition is refused. ``--insecure`` turns
TLS and node authentication off, for a SuperLink that listens on loopback only.

Every process is a child of this one, started in its own session and tagged through its
environment, and ``Loopback.close`` stops them (SuperNodes first, then the SuperLink, as Flower
wants) and waits until no tagged process is left (the SuperLink starts its ServerApp runner in a
session of its own). Each SuperNode gets ``--node-config partition-id=<user>``, so it trains only
its user's partition. Runtime dependency installation is off: the apps import fedmeta from this
environment, offline. The server's run folders are fixed here, by the operator
(``apps.RUNS_ENV``): the run config only names the run.

    python -m fedmeta.engines.flower.deployment CONFIG --out DIR [--host H] [--port P] [--insecure] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, NoReturn, Self

import tomli_w
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

import fedmeta
from fedmeta.config import Config, load_config
from fedmeta.engines.flower.apps import NODES_ENV, RUNS_ENV, run_folder

APP_DIR = Path(__file__).with_name("app")
"""The Flower App that ``flwr run`` builds and sends to the SuperLink."""

STATUS_POLL_S = 10.0
"""Between ``flwr ls`` calls while a run is going (a finished ``summary.json`` ends the wait early)."""

LOOPBACK = ("127.0.0.1", "localhost", "::1")
"""Listen addresses that ``--insecure`` accepts: nothing off this machine can reach them."""

TAG = "FEDMETA_LOOPBACK"
"""Environment variable, set to a fresh token, that marks every process of one deployment."""

FEDERATION = "loopback"
"""The name of the deployment's SuperLink connection in ``$FLWR_HOME/config.toml``."""


class DeploymentError(RuntimeError):
    """The deployment could not start, or the run did not complete."""


# --- credentials -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Certificates:
    """PEM files for TLS: the CA's certificate (the root certificate SuperNodes and ``flwr`` trust)
    and the SuperLink's certificate and private key."""

    ca: Path
    certificate: Path
    key: Path


def write_certificates(folder: Path, hosts: Sequence[str], days: int = 30) -> Certificates:
    """A fresh CA and a SuperLink certificate it signs, valid for ``hosts`` (names or IP addresses:
    every address SuperNodes and ``flwr`` use, and 127.0.0.1, which the SuperLink's own ServerApp
    runner connects to), as ``ca.pem``, ``server.pem`` and ``server.key`` in ``folder``.

    Good for a deployment's lifetime or a test; a long-lived federation uses its own PKI.
    """
    folder.mkdir(parents=True, exist_ok=True)
    start = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)
    end = start + datetime.timedelta(days=days)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedmeta deployment CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP384R1())
    server = (x509.CertificateBuilder()
              .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
              .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(start).not_valid_after(end)
              .add_extension(x509.SubjectAlternativeName([_san(h) for h in dict.fromkeys(hosts)]), critical=False)
              .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
              .add_extension(x509.ExtendedKeyUsage([x509.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
              .sign(ca_key, hashes.SHA256()))
    files = Certificates(folder / "ca.pem", folder / "server.pem", folder / "server.key")
    files.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files.certificate.write_bytes(server.public_bytes(serialization.Encoding.PEM))
    _write_private(files.key, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                serialization.NoEncryption()))
    return files


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def write_node_key(folder: Path, name: str) -> tuple[Path, Path]:
    """A SuperNode's key pair for node authentication, as ``ssh-keygen -t ecdsa -b 384`` writes it
    (Flower reads the private key with ``load_ssh_private_key`` and registers NIST-curve public
    keys in OpenSSH format): ``folder/name`` for ``--auth-supernode-private-key`` and
    ``folder/name.pub`` for ``flwr supernode register``."""
    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = folder / name, folder / f"{name}.pub"
    _write_private(private, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                              serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                     serialization.PublicFormat.OpenSSH) + b"\n")
    return private, public


def _write_private(path: Path, data: bytes) -> None:
    path.touch(mode=0o600)
    path.chmod(0o600)  # a key: readable by its owner only
    path.write_bytes(data)


# --- the deployment ----------------------------------------------------------------------------


class Loopback:
    """A SuperLink on ``host:port`` and one SuperNode per user on this machine; use as a context
    manager. ``runs`` is the server's folder of run folders (the operator's choice). With
    ``secure`` (the default) the SuperLink serves TLS and admits registered SuperNodes only.
    ``home`` (Flower's home: certificates, keys, logs) is a temporary folder unless given; it is
    removed on close unless something failed, so the logs stay for a look."""

    def __init__(self, users: int, runs: Path, home: Path | None = None, *, host: str = "127.0.0.1",
                 port: int | None = None, secure: bool = True, startup_timeout: float = 120.0) -> None:
        if not secure and host not in LOOPBACK:
            raise DeploymentError(f"--insecure is for a SuperLink on loopback only ({', '.join(LOOPBACK)}), "
                                  f"not on {host}: without TLS and node authentication anyone who reaches it "
                                  "could join the federation or read the updates")
        self.users, self.runs, self.secure, self.startup_timeout = users, runs.resolve(), secure, startup_timeout
        self.host, self.port = host, port or _free_port()
        self._own_home = home is None
        self.home = Path(tempfile.mkdtemp(prefix="fedmeta-flwr-")) if home is None else home.resolve()
        self.home.mkdir(parents=True, exist_ok=True)
        self.logs = self.home / "logs"
        self.processes: dict[str, subprocess.Popen] = {}
        self.node_of: dict[int, int] = {}  # user -> node id of the SuperNode registered for it
        self.registered: dict[str, int] = {}  # SuperNode name -> node id, for every registered key
        self.failed = False
        self.token = uuid.uuid4().hex
        self.env = _environment(self.home) | {TAG: self.token, RUNS_ENV: str(self.runs)}
        if secure:
            self.env[NODES_ENV] = str(self.home / "nodes.toml")

    @property
    def address(self) -> str:
        """Where the SuperNodes and ``flwr`` reach the SuperLink."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    def __enter__(self) -> Self:
        try:
            self._start()
        except BaseException:
            self.failed = True
            self.close()
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.failed |= kind is not None
        self.close()

    def _start(self) -> None:
        self.logs.mkdir(exist_ok=True)
        command = ["flower-superlink", "--disable-runtime-dependency-installation", "--host", self.host,
                   "--port", str(self.port)]
        connection: dict[str, Any] = {"address": self.address}
        if self.secure:
            hosts = [h for h in dict.fromkeys([self.host, "127.0.0.1", "localhost"]) if h not in ("0.0.0.0", "::")]
            tls = write_certificates(self.home / "tls", hosts)
            command += ["--ssl-ca-certfile", str(tls.ca), "--ssl-certfile", str(tls.certificate),
                        "--ssl-keyfile", str(tls.key), "--enable-supernode-auth"]
            connection["root-certificates"] = str(tls.ca)
        else:
            command.append("--insecure")
            connection["insecure"] = True
        (self.home / "config.toml").write_text(tomli_w.dumps({"superlink": {"default": FEDERATION,
                                                                          FEDERATION: connection}}))
        self._spawn("superlink", command)
        self._wait_healthy()
        for user in range(self.users):
            self.add_node(user)

    def add_node(self, user: int, *, name: str | None = None, registered: bool = True,
                 trusted: bool = True) -> subprocess.Popen:
        """Start a SuperNode that holds ``user``'s partition. With TLS, it gets a key of its own,
        registered with the SuperLink unless ``registered`` is false (the SuperLink then refuses
        it), and it holds ``user`` for the ServerApp only if ``trusted`` (else it is just another
        registered node that claims ``user``)."""
        name = name or f"supernode-{user}"
        command = ["flower-supernode", "--superlink", self.address, "--host", "127.0.0.1",
                   "--port", str(_free_port()), "--node-config", f"partition-id={user} num-partitions={self.users}"]
        if self.secure:
            private, public = write_node_key(self.home / "keys", name)
            command += ["--root-certificates", str(self.home / "tls" / "ca.pem"),
                        "--auth-supernode-private-key", str(private)]
            if registered:
                node = int(self._flwr(["supernode", "register", str(public), FEDERATION, "--name", name,
                                       "--format", "json"])["node-id"])
                self.registered[name] = node
                if trusted:
                    self.node_of[user] = node
        else:
            command.append("--insecure")
        return self._spawn(name, command)

    def _spawn(self, name: str, command: list[str]) -> subprocess.Popen:
        with (self.logs / f"{name}.log").open("w") as log:  # the child keeps its own copy of the descriptor
            process = subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True)
        self.processes[name] = process
        return process

    def _wait_healthy(self) -> None:
        scheme, context = ("https", ssl.create_default_context(cafile=self.home / "tls" / "ca.pem")) if self.secure \
            else ("http", None)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.processes["superlink"].poll() is not None:
                raise DeploymentError(f"the SuperLink exited; see {self.logs / 'superlink.log'}")
            try:
                with urllib.request.urlopen(f"{scheme}://{self.address}/health", timeout=1, context=context):
                    return
            except OSError:
                time.sleep(0.2)
        raise DeploymentError(f"the SuperLink did not answer on {self.address} in {self.startup_timeout:.0f} s")

    def wait_online(self) -> None:
        """Wait until every registered SuperNode (with TLS) or one SuperNode per user (without) is online."""
        deadline = time.monotonic() + self.startup_timeout
        while True:
            online = {int(n["node-id"]) for n in self._flwr(["supernode", "ls", FEDERATION, "--format", "json"])["nodes"]
                      if n["status"] == "online"}
            if online >= set(self.registered.values()) if self.secure else len(online) >= self.users:
                return
            if time.monotonic() > deadline:
                raise DeploymentError(f"SuperNodes not online after {self.startup_timeout:.0f} s; see {self.logs}")
            time.sleep(1.0)

    def run(self, cfg: Config, name: str, timeout: float = 3600.0) -> dict[str, Any]:
        """Run the experiment through ``flwr run`` into the server's run folder ``name`` and return
        the summary the ServerApp wrote."""
        if cfg.federation.users != self.users:
            raise DeploymentError(f"the deployment has {self.users} SuperNodes; the config has {cfg.federation.users} users")
        summary = run_folder(self.runs, name) / "summary.json"
        self.wait_online()
        if self.secure:
            (self.home / "nodes.toml").write_text(tomli_w.dumps({"nodes": {str(u): n for u, n in self.node_of.items()}}))
        overrides = self.home / "run-config.toml"
        overrides.write_text(tomli_w.dumps({"config": cfg.to_toml(), "run": name}))
        old = _mtime(summary)  # a resumed run's summary from before
        started = self._flwr(["run", str(APP_DIR), FEDERATION, "--run-config", str(overrides), "--format", "json"])
        run_id, clock = int(started["run-id"]), time.monotonic()
        while (status := self._status(run_id))["status"] not in ("finished:completed", "finished:failed",
                                                                  "finished:stopped"):
            if time.monotonic() > clock + timeout:
                self._fail(run_id, f"run {run_id} did not finish in {timeout:.0f} s")
            _wait_for_change(summary, old, STATUS_POLL_S)
        if status["status"] != "finished:completed":
            self._fail(run_id, f"run {run_id} ended {status['status']}: {status.get('status-details', '')}")
        return json.loads(summary.read_text())

    def _fail(self, run_id: int, message: str) -> NoReturn:
        """Keep the logs (the ServerApp's fetched from the SuperLink) and raise ``message``."""
        self.failed = True
        log = self.logs / f"serverapp-{run_id}.log"
        done = subprocess.run(["flwr", "log", str(run_id), FEDERATION, "--show"], env=self.env, capture_output=True,
                              text=True, timeout=300, check=False)
        log.write_text(done.stdout + done.stderr)
        raise DeploymentError(f"{message}; the ServerApp's log is {log}, the other processes' logs are in {self.logs}")

    def _status(self, run_id: int) -> dict[str, Any]:
        return self._flwr(["ls", FEDERATION, "--run-id", str(run_id), "--format", "json"])["runs"][0]

    def _flwr(self, args: list[str]) -> dict[str, Any]:
        done = subprocess.run(["flwr", *args], env=self.env, capture_output=True, text=True, timeout=300, check=False)
        try:
            reply = json.loads(done.stdout)
        except json.JSONDecodeError:
            reply = {"success": False, "error-message": done.stdout + done.stderr}
        if done.returncode or not reply.get("success", True):
            raise DeploymentError(f"flwr {' '.join(args[:2])} failed: {reply.get('error-message', done.stderr)}")
        return reply

    def left(self) -> list[int]:
        """The deployment's processes still alive (any session; Linux lists them from /proc)."""
        return sorted({p.pid for p in self.processes.values() if _session_alive(p.pid)} | set(_tagged(self.token)))

    def close(self, grace: float = 30.0) -> None:
        """Stop the SuperNodes, then the SuperLink, and wait until none of their processes is left."""
        nodes = [p for name, p in self.processes.items() if name != "superlink"]
        for group in (nodes, [p for name, p in self.processes.items() if name == "superlink"]):
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
        while self.left() and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in self.left():
            _signal_session(pid, signal.SIGKILL)
            _kill(pid)
        self.processes = {}
        if self._own_home and not self.failed:
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
    except (ProcessLookupError, PermissionError):
        pass


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _session_alive(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _tagged(token: str) -> list[int]:
    """Processes whose environment carries ``TAG=token``: detached ones too (the SuperLink runs
    its ServerApp runner in a new session). Empty where there is no /proc."""
    needle = f"{TAG}={token}".encode()
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:  # gone, or not ours
            continue
    return found


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="a preset name or a TOML file")
    parser.add_argument("--out", type=Path, required=True,
                        help="run folder; its parent is the server's folder of runs (FEDMETA_RUNS)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="key=value")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address the SuperLink listens on (default 127.0.0.1; its TLS certificate names it)")
    parser.add_argument("--port", type=int, default=None, help="port the SuperLink listens on (default: a free one)")
    parser.add_argument("--insecure", action="store_true",
                        help="no TLS and no SuperNode authentication: for a SuperLink on loopback only "
                             f"({', '.join(LOOPBACK)}); refused with any other --host")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    # A background job ignores SIGINT; make SIGTERM unwind through Loopback.close too.
    signal.signal(signal.SIGTERM, lambda sig, frame: sys.exit(128 + sig))
    clock = time.perf_counter()
    out = args.out.resolve()
    try:
        with Loopback(cfg.federation.users, out.parent, host=args.host, port=args.port,
                      secure=not args.insecure) as deployment:
            summary = deployment.run(cfg, out.name)
    except DeploymentError as err:
        raise SystemExit(f"error: {err}") from None
    print(json.dumps(summary, indent=2))
    print(f"loopback deployment: {time.perf_counter() - clock:.1f} s in all")


if __name__ == "__main__":
    main()
