"""OpenStack Swift as a single-node S3 endpoint (our MinIO stand-in; see ENVIRONMENT.md).

Four servers (account, container, object, proxy) run from configs generated under
``<dir>/swift/`` with one device, replica count 1 and ``workers = 0``. The proxy pipeline puts
``s3api`` before ``tempauth`` (auth needs the S3 signature decoded) and ``slo`` after ``s3api``
(multipart upload needs it); ``cache`` is mandatory for tempauth. The object server answers a
PUT once the object is on disk (synced) without waiting for the container listing's update,
which it sends on alongside (``container_update_timeout = 0``): that wait was 1.2 to 1.9 ms of a
checkpoint's PUT, inside a migration's downtime (a listing right after the PUT still had it in
50 of 50 tries here; a failed update is queued by Swift as an async pending, as on a timeout).
"""

from __future__ import annotations

import asyncio
import shutil
from dataclasses import dataclass
from pathlib import Path

import urllib3
from minio import Minio

from services.common import tls
from services.common.config import S3Config
from tools.stack import pki
from tools.stack.errors import StackError
from tools.stack.probes import Probe, http_status, tcp_accepts

SWIFT_CONF = Path("/etc/swift/swift.conf")
PACKAGE_SWIFT_CONF = Path("/usr/share/doc/swift/examples/swift.conf")
MINIMAL_SWIFT_CONF = """\
# Written by `ferry up`: Swift reads this fixed path whatever swift_dir says.
[swift-hash]
swift_hash_path_suffix = ferry
swift_hash_path_prefix = ferry

[storage-policy:0]
name = Policy-0
default = yes
"""

STORAGE_KINDS = ("account", "container", "object")
PROXY_PIPELINE = "healthcheck proxy-logging cache s3api tempauth slo proxy-logging proxy-server"
DEVICE = "d1"
#: See the module docstring: a PUT does not wait for the container listing's update.
OBJECT_SERVER_OPTIONS = "container_update_timeout = 0\n"

# swift-ring-builder's own main(), driven once for all three rings: one interpreter start
# instead of nine (the import of eventlet dominates; ~0.4 s in total instead of ~6 s of CPU).
_RING_SCRIPT = """\
import sys
from swift.cli.ringbuilder import main
for builder, device in zip(sys.argv[1::2], sys.argv[2::2]):
    for args in (["create", "8", "1", "1"], ["add", device, "100"], ["rebalance"]):
        try:
            main(["swift-ring-builder", builder, *args])
        except SystemExit as exc:
            if exc.code not in (None, 0, 1):  # 1 is EXIT_WARNING
                sys.exit(f"swift-ring-builder {builder} {' '.join(args)}: exit {exc.code}")
"""


@dataclass(frozen=True)
class SwiftPorts:
    """Loopback ports of the three storage servers and the proxy (the S3 endpoint)."""

    account: int
    container: int
    object: int
    proxy: int

    def storage(self, kind: str) -> int:
        return {"account": self.account, "container": self.container, "object": self.object}[kind]


def ensure_swift_conf() -> None:
    """Create ``/etc/swift/swift.conf`` if missing: every Swift server reads that exact path."""
    if SWIFT_CONF.is_file():
        return
    try:
        SWIFT_CONF.parent.mkdir(parents=True, exist_ok=True)
        if PACKAGE_SWIFT_CONF.is_file():
            shutil.copyfile(PACKAGE_SWIFT_CONF, SWIFT_CONF)
        else:
            SWIFT_CONF.write_text(MINIMAL_SWIFT_CONF)
    except OSError as exc:
        raise StackError(
            "swift", f"{SWIFT_CONF} is missing and cannot be created ({exc}); create it as root"
        ) from exc


def write_configs(
    swift_dir: Path,
    host: str,
    ports: SwiftPorts,
    memcached: str,
    s3: S3Config,
    server: pki.Pair | None = None,
) -> dict[str, Path]:
    """Write the four server configs; returns ``{"swift-account": conf_path, …}``.

    With ``server`` the proxy (the S3 endpoint) serves https only, with that certificate;
    the storage servers behind it stay on loopback and speak plain HTTP to it.
    """
    account, sep, user = s3.access_key.partition(":")
    if not sep or not account or not user:
        raise StackError(
            "swift-proxy",
            f"s3.access_key {s3.access_key!r} must be ACCOUNT:USER (tempauth's form)",
        )
    devices = swift_dir / "devices"
    (devices / DEVICE).mkdir(parents=True, exist_ok=True)
    confs: dict[str, Path] = {}
    for kind in STORAGE_KINDS:
        path = swift_dir / f"{kind}-server.conf"
        path.write_text(
            _common(host, ports.storage(kind), swift_dir, f"swift-{kind}")
            + f"devices = {devices}\n"
            "mount_check = false\n"
            "disable_fallocate = true\n\n"
            f"[pipeline:main]\npipeline = {kind}-server\n\n"
            f"[app:{kind}-server]\nuse = egg:swift#{kind}\n"
            + (OBJECT_SERVER_OPTIONS if kind == "object" else "")
        )
        confs[f"swift-{kind}"] = path
    proxy = swift_dir / "proxy-server.conf"
    proxy.write_text(
        _common(host, ports.proxy, swift_dir, "swift-proxy")
        + (f"cert_file = {server.cert}\nkey_file = {server.key}\n" if server else "")
        + f"\n[pipeline:main]\npipeline = {PROXY_PIPELINE}\n\n"
        "[app:proxy-server]\nuse = egg:swift#proxy\naccount_autocreate = true\n\n"
        "[filter:healthcheck]\nuse = egg:swift#healthcheck\n\n"
        "[filter:proxy-logging]\nuse = egg:swift#proxy_logging\n\n"
        f"[filter:cache]\nuse = egg:swift#memcache\nmemcache_servers = {memcached}\n\n"
        f"[filter:s3api]\nuse = egg:swift#s3api\nlocation = {s3.region}\n\n"
        "[filter:tempauth]\nuse = egg:swift#tempauth\n"
        f"user_{account}_{user} = {s3.secret_key} .admin\n\n"
        "[filter:slo]\nuse = egg:swift#slo\n"
    )
    confs["swift-proxy"] = proxy
    return confs


def _common(host: str, port: int, swift_dir: Path, log_name: str) -> str:
    # bind_timeout: Swift retries a busy port for 30 s by default; fail fast instead.
    # client_timeout: a download to a slow edge link stalls the proxy, and so the object server
    # writing to it; at the default 60 s the object server gives up mid-blob (seen with 8 MB
    # archives, 8 at once over 5 Mbit/s).
    return (
        "[DEFAULT]\n"
        f"bind_ip = {host}\n"
        f"bind_port = {port}\n"
        "bind_timeout = 3\n"
        "client_timeout = 600\n"
        "workers = 0\n"
        f"swift_dir = {swift_dir}\n"
        f"log_name = {log_name}\n"
        "log_level = INFO\n"
    )


async def build_rings(swift_dir: Path, host: str, ports: SwiftPorts, ring_builder: str) -> None:
    """(Re)build account, container and object rings: one device each, one replica."""
    await asyncio.to_thread(_remove_rings, swift_dir)
    args: list[str] = []
    for kind in STORAGE_KINDS:
        args += [str(swift_dir / f"{kind}.builder"), f"r1z1-{host}:{ports.storage(kind)}/{DEVICE}"]
    proc = await asyncio.create_subprocess_exec(
        interpreter_of(ring_builder),
        "-c",
        _RING_SCRIPT,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=swift_env(),
    )
    output, _ = await proc.communicate()
    if proc.returncode != 0:
        raise StackError(
            "swift-rings",
            f"building rings with {ring_builder} failed (exit {proc.returncode})",
            log=None,
            log_tail=output.decode(errors="replace").splitlines()[-20:],
        )


def _remove_rings(swift_dir: Path) -> None:
    for stale in [*swift_dir.glob("*.builder"), *swift_dir.glob("*.ring.gz")]:
        stale.unlink()
    shutil.rmtree(swift_dir / "backups", ignore_errors=True)


def interpreter_of(script: str) -> str:
    """The Python that runs a Swift console script (the one with the ``swift`` package)."""
    with open(script, "rb") as f:
        first = f.readline()
    if first.startswith(b"#!"):
        parts = first[2:].decode().split()
        if parts:
            return parts[0]
    return "python3"


def swift_env() -> dict[str, str]:
    """Environment additions for Swift processes.

    ``EVENTLET_NO_GREENDNS`` skips eventlet's dnspython import, halving each server's start-up
    time; everything here is addressed by IP, so green DNS buys nothing.
    """
    return {"EVENTLET_NO_GREENDNS": "yes"}


def server_argv(binary: str, conf: Path) -> list[str]:
    """Foreground server with ``-v`` so its log goes to stdout (there is no syslog here)."""
    return [binary, str(conf), "-v"]


async def probe_storage(host: str, port: int) -> Probe:
    return await tcp_accepts(host, port)


async def probe_proxy(host: str, port: int, s3: S3Config, create_bucket: bool) -> Probe:
    """Ready when ``/healthcheck`` answers 200 and a real S3 call succeeds.

    With ``create_bucket`` the configured bucket is made if missing (what ``up`` wants);
    otherwise its existence is only checked (what ``status`` wants).
    """
    code = await http_status(host, port, "/healthcheck", tls=tls.s3_context(s3))
    if code != 200:
        return Probe(False, f"/healthcheck on {host}:{port} answered {code or 'nothing'}")
    try:
        return await asyncio.to_thread(_s3_check, f"{host}:{port}", s3, create_bucket)
    except Exception as exc:  # any S3 or HTTP failure just means "not ready yet"
        return Probe(False, f"S3 not answering yet: {_short(exc)}")


def _s3_check(endpoint: str, s3: S3Config, create_bucket: bool) -> Probe:
    client = Minio(
        endpoint,
        access_key=s3.access_key,
        secret_key=s3.secret_key,
        region=s3.region,
        secure=s3.secure,
        # No retries and short timeouts: the caller polls, and each poll must stay short.
        http_client=urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=1.0, read=5.0),
            retries=False,
            **tls.urllib3_options(s3),
        ),
    )
    if client.bucket_exists(s3.bucket):
        return Probe(True, f"S3 on {endpoint}, bucket {s3.bucket!r} present")
    if not create_bucket:
        return Probe(False, f"S3 on {endpoint} answers but bucket {s3.bucket!r} is missing")
    client.make_bucket(s3.bucket, location=s3.region)
    return Probe(True, f"S3 on {endpoint}, bucket {s3.bucket!r} created")


def _short(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:160]
