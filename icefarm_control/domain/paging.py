"""Page sizes and page tokens for the list RPCs."""

from __future__ import annotations

import base64
from datetime import datetime

from icefarm_control.domain.errors import InvalidArgument
from icefarm_control.domain.settings import Limits


def page_size(requested: int, limits: Limits) -> int:
    """The page size to use: the default for 0, capped at the maximum."""
    if requested < 0:
        raise InvalidArgument("page_size", "must not be negative")
    return min(requested or limits.default_page_size, limits.max_page_size)


def encode_time_token(time: datetime, key: str) -> str:
    """An opaque token for 'after (time, key)' in a newest-first listing."""
    return base64.urlsafe_b64encode(f"{time.isoformat()}|{key}".encode()).decode()


def decode_time_token(token: str) -> tuple[datetime, str] | None:
    if not token:
        return None
    try:
        time_text, key = base64.urlsafe_b64decode(token.encode()).decode().split("|", 1)
        return datetime.fromisoformat(time_text), key
    except ValueError as exc:
        raise InvalidArgument("page_token", "not a token this server issued") from exc
