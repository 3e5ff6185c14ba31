"""Page sizes and page tokens for the list RPCs."""

from __future__ import annotations

import base64
from datetime import datetime

from icefarm_control.domain.errors import InvalidArgument
from icefarm_control.domain.settings import Limits

NOT_OURS = "not a token this server issued"


def page_size(requested: int, limits: Limits) -> int:
    """The page size to use: the default for 0, capped at the maximum."""
    if requested < 0:
        raise InvalidArgument("page_size", "must not be negative")
    return min(requested or limits.default_page_size, limits.max_page_size)


def encode_time_token(time: datetime, key: str) -> str:
    """An opaque token for 'after (time, key)' in a newest-first listing."""
    return base64.urlsafe_b64encode(f"{time.isoformat()}|{key}".encode()).decode()


def decode_time_token(token: str) -> tuple[datetime, str] | None:
    """The (time, key) a token of `encode_time_token` holds; InvalidArgument naming page_token
    for anything else (a naive or garbled time would otherwise reach the database)."""
    if not token:
        return None
    try:
        time_text, key = base64.urlsafe_b64decode(token.encode()).decode().split("|", 1)
        time = datetime.fromisoformat(time_text)
    except ValueError as exc:
        raise InvalidArgument("page_token", NOT_OURS) from exc
    if time.tzinfo is None or time.utcoffset() is None or not key.isprintable():
        raise InvalidArgument("page_token", NOT_OURS)
    return time, key
