"""Fixtures: real `embark up` processes on free loopback ports.

The binary is the workspace's debug build (EMBARK_BIN_DIR, set by
test.sh). Every server gets its own data directory, logs to a file that a
failed start prints, and is stopped by its PID at teardown, so a failing
test leaves nothing running.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import pytest

from embark_client import EmbArk, LookupResult, Source

MODEL = "minilm-l6-v2"
DIM = 384
#: The plain server's --max-batch-keys: small, so that tests can exceed it
#: cheaply.
SERVER_MAX_BATCH_KEYS = 16
#: How long a new key may take to be embedded by the debug build.
FILL_BOUND_SECS = 90.0
READY_BOUND_SECS = 120.0

_CACHE = Path(os.environ.get("EMBARK_CACHE") or Path.home() / ".cache" / "embark")


def _bin_dir() -> Path:
    explicit = os.environ.get("EMBARK_BIN_DIR")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("CARGO_TARGET_DIR") or _CACHE / "target") / "debug"


def embark_binary() -> Path:
    path = _bin_dir() / "embark"
    if not path.is_file():
        # A failure, not a skip: a suite that skips when the binary is
        # missing would pass without testing anything.
        pytest.fail(f"{path} is not built: run `cargo build --workspace --bins` or set EMBARK_BIN_DIR")
    return path


def free_port() -> int:
    """A free loopback port (bound, then released for the server)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def server_env() -> dict[str, str]:
    """The environment without EMBARK_* settings (a developer's
    EMBARK_AUTH_TOKENS or EMBARK_LISTEN would change what is tested),
    plus the weights."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMBARK_")}
    env["EMBARK_MODELS_DIR"] = os.environ.get("EMBARK_MODELS_DIR") or str(_CACHE / "models")
    env["RUST_LOG"] = "info"
    return env


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    address: str  # host:port of gRPC
    metrics: str  # host:port of /metrics, /readyz
    log: Path
    uds: Optional[Path]

    @property
    def target(self) -> str:
        return f"http://{self.address}"

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def wait_ready(self, bound: float) -> None:
        started = time.monotonic()
        while True:
            status = self.process.poll()
            if status is not None:
                raise RuntimeError(f"embark up exited with {status} before it was ready:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"http://{self.metrics}/readyz", timeout=2) as reply:
                    if reply.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() - started > bound:
                raise RuntimeError(f"embark up not ready after {bound} s:\n{self.log_tail()}")
            time.sleep(0.1)

    def stop(self) -> None:
        """SIGTERM to this PID, then SIGKILL if it does not exit in time."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=20)


def start_server(workdir: Path, *extra: str, uds: bool = False) -> Server:
    """`embark up` serving MODEL from an embedded store in `workdir`."""
    binary = embark_binary()
    workdir.mkdir(parents=True, exist_ok=True)
    address = f"127.0.0.1:{free_port()}"
    metrics = f"127.0.0.1:{free_port()}"
    socket_path = workdir / "embark.sock" if uds else None
    args = [
        str(binary), "up",
        "--models", MODEL,
        "--data-dir", str(workdir / "data"),
        "--listen", address,
        "--metrics-listen", metrics,
        *(["--uds", str(socket_path)] if socket_path else []),
        *extra,
    ]  # fmt: skip
    log = workdir / "server.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=out, env=server_env())
    server = Server(process, address, metrics, log, socket_path)
    try:
        server.wait_ready(READY_BOUND_SECS)
    except BaseException:
        server.stop()
        raise
    return server


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A plaintext server, also on a Unix socket, with a small batch limit."""
    s = start_server(tmp_path_factory.mktemp("plain"), "--max-batch-keys", str(SERVER_MAX_BATCH_KEYS), uds=True)
    yield s
    s.stop()


#: Texts with a near duplicate among them, for Similar.
SHOES = [
    "a red running shoe",
    "a crimson running sneaker",
    "a bowl of hot tomato soup",
    "quarterly stock market report",
]


@pytest.fixture(scope="session")
def shoes(server: Server) -> np.ndarray:
    """SHOES embedded by the plain server (the same texts in every run:
    each run has a fresh server and store)."""
    with EmbArk(server.target, timeout=30.0) as c:
        return wait_filled(c, SHOES).matrix.copy()


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`embark dev-certs`: a CA, a server certificate for "embark" (and
    127.0.0.1), a read token `ranker`, an admin token `ops`, and a client
    certificate `scorer` (a read principal under mTLS)."""
    out = tmp_path_factory.mktemp("certs")
    subprocess.run(
        [str(embark_binary()), "dev-certs", "--out", str(out), "--server", "embark",
         "--token", "ranker=read", "--token", "ops=admin", "--client", "scorer"],
        check=True, env=server_env(), timeout=120, capture_output=True,
    )  # fmt: skip
    return out


@pytest.fixture(scope="session")
def tls_server(tmp_path_factory: pytest.TempPathFactory, certs: Path) -> Iterator[Server]:
    """A server that speaks TLS only and wants a token on every call."""
    s = start_server(
        tmp_path_factory.mktemp("tls"),
        "--tls-cert", str(certs / "embark.pem"),
        "--tls-key", str(certs / "embark.key"),
        "--auth-tokens", str(certs / "tokens.toml"),
    )  # fmt: skip
    yield s
    s.stop()


@pytest.fixture(scope="session")
def mtls_server(tmp_path_factory: pytest.TempPathFactory, certs: Path) -> Iterator[Server]:
    """A server that wants a client certificate signed by the dev CA."""
    s = start_server(
        tmp_path_factory.mktemp("mtls"),
        "--tls-cert", str(certs / "embark.pem"),
        "--tls-key", str(certs / "embark.key"),
        "--tls-client-ca", str(certs / "ca.pem"),
        "--auth-tokens", str(certs / "tokens.toml"),
    )  # fmt: skip
    yield s
    s.stop()


@pytest.fixture(autouse=True)
def _no_ambient_token(monkeypatch: pytest.MonkeyPatch) -> None:
    """A developer's $EMBARK_TOKEN must not decide what a test sends."""
    monkeypatch.delenv("EMBARK_TOKEN", raising=False)


@pytest.fixture
def client(server: Server) -> Iterator[EmbArk]:
    with EmbArk(server.target, timeout=30.0) as c:
        yield c


def fresh_keys(n: int, label: str = "item") -> list[str]:
    """Texts no earlier test has looked up."""
    run = uuid.uuid4().hex[:12]
    return [f"{label} {i} of run {run}" for i in range(n)]


def wait_filled(client: EmbArk, keys: list[str], bound: float = FILL_BOUND_SECS) -> LookupResult:
    """Asks again until every key has a real vector; fails after `bound`."""
    started = time.monotonic()
    while True:
        result = client.lookup(MODEL, keys)
        if result.mask.all():
            return result
        failed = [k for k, s in zip(keys, result.sources) if s == Source.OOV_FAILED]
        assert not failed, f"keys could not be embedded: {failed}"
        if time.monotonic() - started > bound:
            pytest.fail(f"{int((~result.mask).sum())} of {len(keys)} keys still not embedded after {bound} s")
        time.sleep(0.1)
