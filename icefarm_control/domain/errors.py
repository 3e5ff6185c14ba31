"""Domain errors. Each carries a stable reason (the names of icefarm.v1.ErrorReason without the
prefix; a unit test keeps the two in step) and a kind the transport maps to a gRPC status."""

from __future__ import annotations

import enum


class Reason(enum.StrEnum):
    NOT_ENOUGH_DEVICES = "NOT_ENOUGH_DEVICES"
    RESERVATION_NOT_FOUND = "RESERVATION_NOT_FOUND"
    NOT_HOLDER = "NOT_HOLDER"
    WORKER_DRAINING = "WORKER_DRAINING"
    INVALID_SELECTOR = "INVALID_SELECTOR"
    INVALID_FIELD = "INVALID_FIELD"
    DEVICE_NOT_FOUND = "DEVICE_NOT_FOUND"
    WORKER_NOT_FOUND = "WORKER_NOT_FOUND"
    DEVICE_NOT_AVAILABLE = "DEVICE_NOT_AVAILABLE"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    WORKER_ALREADY_CONNECTED = "WORKER_ALREADY_CONNECTED"
    ILLEGAL_TRANSITION = "ILLEGAL_TRANSITION"
    TOKEN_INVALID = "TOKEN_INVALID"
    MODE_UNSUPPORTED = "MODE_UNSUPPORTED"
    DEVICE_FAILED = "DEVICE_FAILED"
    SHUTTING_DOWN = "SHUTTING_DOWN"
    CONFLICT = "CONFLICT"
    RESERVATION_ENDED = "RESERVATION_ENDED"
    LIMIT_EXCEEDED = "LIMIT_EXCEEDED"
    INTERNAL = "INTERNAL"


class IcefarmDomainError(Exception):
    """Base of every error the domain raises on purpose."""

    reason: Reason = Reason.CONFLICT

    def __init__(self, message: str, *, reason: Reason | None = None) -> None:
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason


class InvalidArgument(IcefarmDomainError):
    """A request field is malformed or out of range; `field` names it."""

    reason = Reason.INVALID_FIELD

    def __init__(self, field: str, message: str, *, reason: Reason | None = None) -> None:
        super().__init__(f"{field}: {message}", reason=reason)
        self.field = field
        self.description = message


class SelectorError(InvalidArgument):
    """A selector does not parse. `position` is the 0-based offset of the offending character."""

    reason = Reason.INVALID_SELECTOR

    def __init__(self, message: str, position: int, *, field: str = "selector") -> None:
        super().__init__(field, f"{message} at position {position}")
        self.position = position


class NotFound(IcefarmDomainError):
    reason = Reason.DEVICE_NOT_FOUND


class PermissionDenied(IcefarmDomainError):
    reason = Reason.NOT_HOLDER


class Unauthenticated(IcefarmDomainError):
    reason = Reason.UNAUTHENTICATED


class NotEnoughDevices(IcefarmDomainError):
    """Not enough matching devices are free. `waited` tells whether the caller queued first;
    `counts` (wanted, matching, free), when known, travel in ErrorInfo.metadata."""

    reason = Reason.NOT_ENOUGH_DEVICES

    def __init__(
        self, message: str, *, waited: bool = False, counts: dict[str, int] | None = None
    ) -> None:
        super().__init__(message)
        self.waited = waited
        self.counts = dict(counts or {})


class LimitExceeded(IcefarmDomainError):
    """A bound on what one caller may have or do was reached (RESOURCE_EXHAUSTED);
    `retry_after` seconds, when known, say when it will have passed."""

    reason = Reason.LIMIT_EXCEEDED

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class FailedPrecondition(IcefarmDomainError):
    reason = Reason.DEVICE_NOT_AVAILABLE


class ReservationEnded(FailedPrecondition):
    """The reservation named has ended; the message says when and why."""

    reason = Reason.RESERVATION_ENDED


class AlreadyExists(IcefarmDomainError):
    reason = Reason.WORKER_ALREADY_CONNECTED


class IllegalTransition(FailedPrecondition):
    reason = Reason.ILLEGAL_TRANSITION


class Unavailable(IcefarmDomainError):
    reason = Reason.SHUTTING_DOWN


class Internal(IcefarmDomainError):
    """A bug: reported as INTERNAL with an incident id, nothing of it on the wire."""

    reason = Reason.INTERNAL
