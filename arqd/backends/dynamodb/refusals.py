"""How DynamoDB's failures reach the backend: the toolkit (``arqd.backends.aws``) maps every
botocore failure to an arqd error; this module only reads DynamoDB's own refusals first (a
failed condition and a cancelled transaction become internal exceptions the backend catches,
a missing table an error that says how to create it)."""

from __future__ import annotations

from typing import Any

from arqd.backends import aws
from arqd.errors import BackendError

UNAVAILABLE_CODES = frozenset(
    {
        "ProvisionedThroughputExceededException",
        "ThrottlingException",
        "RequestLimitExceeded",
        "InternalServerError",
        "ServiceUnavailable",
        "LimitExceededException",
        "TransactionInProgressException",
    }
)
# A cancelled transaction's per-action reasons that mean "later", not "no".
THROTTLED_REASONS = frozenset({"ThrottlingError", "ProvisionedThroughputExceeded"})


class _ConditionFailed(Exception):
    """A conditional write was refused; ``item`` is the item as it stood (if it exists)."""

    def __init__(self, item: dict[str, Any] | None) -> None:  # an item in wire format
        super().__init__("condition failed")
        self.item = item


class _Cancelled(Exception):
    """A transaction was refused; ``reasons`` are DynamoDB's, one per action."""

    def __init__(self, reasons: list[dict[str, Any]]) -> None:
        super().__init__("transaction cancelled")
        self.reasons = reasons


def _refusal(op: str, answer: aws.Refusal) -> Exception | None:
    """DynamoDB's own refusals: a failed condition, a cancelled transaction, a missing table."""
    if answer.code == "ConditionalCheckFailedException":
        return _ConditionFailed(answer.response.get("Item"))
    if answer.code == "TransactionCanceledException":
        return _Cancelled(answer.response.get("CancellationReasons") or [])
    if answer.code == "ResourceNotFoundException":
        return BackendError(f"dynamodb {op}: the table does not exist (run `arqd init-aws`)")
    return None


def _translate(op: str, exc: BaseException) -> Exception:
    """Map one botocore failure to an arqd error (or an internal refusal)."""
    return aws.translate("dynamodb", op, exc, unavailable=UNAVAILABLE_CODES, refine=_refusal)
