"""Where the control is and who we are: settings from arguments or the environment, channels
(plaintext by default, TLS when asked), call metadata, and the retry policy for UNAVAILABLE."""

from __future__ import annotations

import getpass
import ipaddress
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path

import grpc

from icefarm.metadata import TOKEN_METADATA_KEY

DEFAULT_PORT = 50051
DEFAULT_CONTROL = f"127.0.0.1:{DEFAULT_PORT}"
# gRPC target schemes passed through untouched ("ipv4:a:1,b:2", "dns:///host:1", "unix:...").
_SCHEMES = ("ipv4:", "ipv6:", "dns:", "unix:", "unix-abstract:", "vsock:")


def control_target(address: str) -> str:
    """The gRPC target for a control address: HOST[:PORT], several of them comma-separated,
    or a gRPC target with a scheme. A host without a port gets the control's default port
    (50051), not gRPC's own default (443)."""
    address = address.strip()
    if address.startswith(_SCHEMES) or "://" in address:
        return address
    hosts = [_with_port(part.strip()) for part in address.split(",") if part.strip()]
    if len(hosts) <= 1:
        return hosts[0] if hosts else DEFAULT_CONTROL
    # Several replicas: gRPC takes a list of IP addresses (a DNS name with several records
    # is the other way).
    if all(_is_ip(h.rsplit(":", 1)[0], 4) for h in hosts):
        return "ipv4:" + ",".join(hosts)
    if all(_is_ip(h.rsplit(":", 1)[0].strip("[]"), 6) for h in hosts):
        return "ipv6:" + ",".join(hosts)
    return ",".join(hosts)


def _is_ip(text: str, version: int) -> bool:
    try:
        return ipaddress.ip_address(text).version == version
    except ValueError:
        return False


def _with_port(host: str) -> str:
    if host.startswith("["):  # [::1] or [::1]:50051
        return host if "]:" in host else f"{host}:{DEFAULT_PORT}"
    if host.count(":") > 1:  # a bare IPv6 address
        return f"[{host}]:{DEFAULT_PORT}"
    return host if ":" in host else f"{host}:{DEFAULT_PORT}"


CLIENT_ID_HEADER = "icefarm-client-id"
# Keepalive as the architecture asks: ping every 10 s, also without calls in flight.
CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
)
_UNSAFE = re.compile(r"[^\x21-\x7e]")


def default_client_id() -> str:
    """user@host, restricted to the printable ASCII the control accepts."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "user"
    text = f"{user}@{socket.gethostname()}"
    return _UNSAFE.sub("_", text)[:256] or "icefarm-client"


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded, jittered retries of calls that failed with UNAVAILABLE (nothing else)."""

    attempts: int = 5
    initial_backoff: float = 0.2
    max_backoff: float = 3.0


@dataclass(frozen=True)
class Settings:
    """How to reach the farm. Build with `Settings.resolve(...)`: each argument left None is
    taken from the environment (`ICEFARM_CONTROL`, `ICEFARM_TOKEN`, `ICEFARM_CLIENT_ID`,
    `ICEFARM_TLS`, `ICEFARM_TLS_CA`, `ICEFARM_TLS_CERT`, `ICEFARM_TLS_KEY`), then defaults."""

    control: str = DEFAULT_CONTROL
    client_id: str = ""
    token: str = ""
    tls: bool = False
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    retry: RetryPolicy = RetryPolicy()
    timeout: float = 30.0

    @classmethod
    def resolve(
        cls,
        control: str | None = None,
        *,
        client_id: str | None = None,
        token: str | None = None,
        tls: bool | None = None,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        retry: RetryPolicy | None = None,
        timeout: float | None = None,
    ) -> Settings:
        """Arguments first, then the environment, then the defaults."""
        env = os.environ
        ca = tls_ca if tls_ca is not None else env.get("ICEFARM_TLS_CA", "")
        cert = tls_cert if tls_cert is not None else env.get("ICEFARM_TLS_CERT", "")
        key = tls_key if tls_key is not None else env.get("ICEFARM_TLS_KEY", "")
        if tls is None:
            flag = env.get("ICEFARM_TLS", "").strip().lower()
            tls = flag in ("1", "true", "yes", "on") or bool(ca or cert)
        return cls(
            control=control_target(control or env.get("ICEFARM_CONTROL") or DEFAULT_CONTROL),
            client_id=client_id or env.get("ICEFARM_CLIENT_ID") or default_client_id(),
            token=token if token is not None else env.get("ICEFARM_TOKEN", ""),
            tls=tls,
            tls_ca=ca,
            tls_cert=cert,
            tls_key=key,
            retry=retry or RetryPolicy(),
            timeout=timeout if timeout is not None else 30.0,
        )

    def metadata(self, reservation_token: str = "") -> tuple[tuple[str, str], ...]:
        """Call metadata: identity, bearer token, and a worker token when given."""
        items = [(CLIENT_ID_HEADER, self.client_id)]
        if self.token:
            items.append(("authorization", f"Bearer {self.token}"))
        if reservation_token:
            items.append((TOKEN_METADATA_KEY, reservation_token))
        return tuple(items)

    def open_channel(self, address: str) -> grpc.aio.Channel:
        """An asyncio channel to `address` (the control or a worker)."""
        if not self.tls:
            return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        return grpc.aio.secure_channel(address, self._credentials(), options=CHANNEL_OPTIONS)

    def _credentials(self) -> grpc.ChannelCredentials:
        def read(path: str) -> bytes | None:
            return Path(path).expanduser().read_bytes() if path else None

        return grpc.ssl_channel_credentials(
            root_certificates=read(self.tls_ca),
            private_key=read(self.tls_key),
            certificate_chain=read(self.tls_cert),
        )
