"""What the workflows raise to their callers: typed failures, and activity failures passed on whole."""

from __future__ import annotations

from temporalio.exceptions import ApplicationError

from sandbox import errors
from sandbox.failures import from_application_error, to_application_error
from workflows.errors import failure, forwarded


def test_a_forwarded_activity_failure_keeps_type_message_attributes_and_retryable() -> None:
    for sent in (
        errors.DisplayStackError("x11vnc did not start", stage="x11vnc", retryable=True),
        errors.PathNotFound("no such dir", path="/workspace/missing"),
    ):
        cause = to_application_error(sent)
        cause.__cause__ = sent
        out = forwarded(cause)
        assert (out.type, out.message, out.non_retryable) == (cause.type, cause.message, cause.non_retryable)
        assert list(out.details) == [sent.attributes()]
        assert out.__cause__ is None  # the activity's chain stays in the activity's history event
        got = from_application_error(out)
        assert type(got) is type(sent) and got.attributes() == sent.attributes() and got.retryable is sent.retryable


def test_a_recorded_cause_without_details_is_forwarded_as_it_was() -> None:
    out = forwarded(ApplicationError("gone", type="BoxNotFound", non_retryable=True))
    assert (out.type, out.message, out.non_retryable, list(out.details)) == ("BoxNotFound", "gone", True, [])


def test_failure_is_the_class_with_its_defaults() -> None:
    out = failure(errors.ProvisionFailed, "the probe failed")
    assert (out.type, out.non_retryable) == ("ProvisionFailed", False)
    got = from_application_error(out)
    assert type(got) is errors.ProvisionFailed and got.retryable and got.message == "the probe failed"
    stale = failure(errors.StaleEpoch, "epoch 3 is fenced")
    assert stale.non_retryable and type(from_application_error(stale)) is errors.StaleEpoch
