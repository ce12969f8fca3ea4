"""The life of a deletion request: its states and the transitions allowed between them.

A request is recorded ``pending`` when submitted, becomes ``processing`` when a sweep claims
it, and ends ``done`` (forgotten, a new model version produced), ``rejected`` (it does not
fit the data: unknown ids, empty forget set), ``failed`` (an error; it can be retried) or
``needs-retrain`` (the approximate unlearning failed its gates and the fallback kept the
parent version: only an exact retrain on the data minus the tombstones can finish it).

Everything here is pure: the ledger (``tasks/ledger.py``) stores states and transitions, and
calls :func:`check_transition` before writing one, so every store enforces the same rules.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Literal, get_args

Status = Literal["pending", "processing", "done", "rejected", "failed", "needs-retrain"]

#: Every state, in lifecycle order.
STATUSES: tuple[Status, ...] = get_args(Status)

#: States a request never leaves.
TERMINAL: frozenset[Status] = frozenset({"done", "rejected"})

#: ``from -> allowed targets``. ``failed -> pending`` is the explicit retry;
#: ``needs-retrain -> done`` is recorded once an exact retrain has removed the request's data.
TRANSITIONS: MappingProxyType[Status, frozenset[Status]] = MappingProxyType(
    {
        "pending": frozenset({"processing", "rejected"}),
        "processing": frozenset({"done", "failed", "rejected", "needs-retrain"}),
        "failed": frozenset({"pending"}),
        "needs-retrain": frozenset({"done"}),
        "done": frozenset(),
        "rejected": frozenset(),
    }
)


class InvalidTransition(ValueError):
    """A state change that the request lifecycle does not allow; the message lists the valid
    targets from the current state."""


def check_status(status: str) -> Status:
    """Return ``status`` typed as :data:`Status`, or raise ``ValueError`` listing the states."""
    if status not in STATUSES:
        raise ValueError(f"unknown request status {status!r}; valid: {', '.join(STATUSES)}")
    return status  # type: ignore[return-value]


def allowed_targets(current: str) -> frozenset[Status]:
    """The states a request in ``current`` may move to (empty for terminal states)."""
    return TRANSITIONS[check_status(current)]


def check_transition(current: str, target: str, request_id: str = "?") -> None:
    """Raise :class:`InvalidTransition` unless ``current -> target`` is allowed.

    The message names the request, both states and the valid targets, because a refused
    transition usually means two workers disagree about a request and an operator must see
    which one.
    """
    cur = check_status(current)
    tgt = check_status(target)
    allowed = TRANSITIONS[cur]
    if tgt not in allowed:
        valid = ", ".join(s for s in STATUSES if s in allowed) or f"none: {cur!r} is final"
        raise InvalidTransition(
            f"request {request_id}: cannot go from {cur!r} to {tgt!r}; valid from {cur!r}: {valid}"
        )


def utc_now_iso() -> str:
    """The current time as an ISO-8601 string in UTC (``...+00:00``), microsecond precision."""
    return datetime.now(UTC).isoformat(timespec="microseconds")


@dataclass(frozen=True)
class Transition:
    """One recorded state change of a request.

    ``from_status`` is ``None`` for the first event (the submission that creates the request
    as ``pending``); ``at`` is an ISO-8601 UTC time; ``reason`` says why, for the audit trail.
    """

    request_id: str
    from_status: Status | None
    to_status: Status
    at: str
    reason: str

    @classmethod
    def make(
        cls,
        request_id: str,
        from_status: str | None,
        to_status: str,
        reason: str,
        at: str | None = None,
    ) -> Transition:
        """Build a transition after checking it against the lifecycle.

        ``from_status=None`` is only valid with ``to_status='pending'`` (a submission).
        ``at`` defaults to now (UTC).
        """
        if from_status is None:
            if to_status != "pending":
                raise InvalidTransition(
                    f"request {request_id}: a new request starts as 'pending', not {to_status!r}"
                )
        else:
            check_transition(from_status, to_status, request_id)
        return cls(
            request_id=request_id,
            from_status=None if from_status is None else check_status(from_status),
            to_status=check_status(to_status),
            at=at if at is not None else utc_now_iso(),
            reason=reason,
        )
