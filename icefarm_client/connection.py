"""Where the control is and who we are: settings from arguments or the environment, channels
(plaintext by default, TLS when asked), call metadata, and the retry policy for UNAVAILABLE."""

from __future__ import annotations

import getpass
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path

import grpc

from icefarm.metadata import TOKEN_METADATA_KEY

DEFAULT_CONTROL = "127.0.0.1:50051"
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
            control=control or env.get("ICEFARM_CONTROL") or DEFAULT_CONTROL,
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
