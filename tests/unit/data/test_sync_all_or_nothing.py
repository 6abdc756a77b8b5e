"""The sync stage is all or nothing unless the config accepts a share of losses: the rule on a
SyncReport. Real downloads that fail are in tests/s3/test_faults.py (moto behind a proxy)."""

from __future__ import annotations

import logging

import pytest

from darkroom.config import RetrainConfig
from darkroom.data.fetch import MAX_FAILED_REASONS, SyncReport
from darkroom.data.sync import SyncDenied, SyncIncomplete, check_complete
from darkroom.storage import StorageError, StorageSetupError

WHERE = "s3://b/p/labeled/"


def _report(listed: int, failed: int) -> SyncReport:
    report = SyncReport(prefix="labeled/", listed=listed, new=listed)
    for i in range(failed):
        report.add_failure(f"labeled/cat/{i:03d}.jpg", StorageError(f"reason {i}"))
    return report


def test_no_failure_passes_at_any_threshold():
    check_complete(_report(10, 0), WHERE)
    check_complete(_report(0, 0), WHERE, 0.5)


def test_by_default_one_failure_stops_the_run():
    with pytest.raises(SyncIncomplete) as e:
        check_complete(_report(1434, 1), WHERE)
    message = str(e.value)
    assert message.startswith(f"1 of 1434 objects under {WHERE} could not be downloaded")
    assert "labeled/cat/000.jpg: reason 0" in message
    assert "max_failed_fraction 0 allows none" in message
    assert "the retrain stops before indexing" in message


def test_message_names_the_first_few_keys_and_counts_the_rest():
    with pytest.raises(SyncIncomplete) as e:
        check_complete(_report(100, 7), WHERE)
    message = str(e.value)
    assert "7 of 100 objects" in message
    for i in range(3):
        assert f"labeled/cat/{i:03d}.jpg: reason {i}" in message
    assert "labeled/cat/003.jpg" not in message
    assert "; 4 more)" in message


def test_losses_under_the_threshold_go_on_with_a_warning(caplog):
    report = _report(30, 2)
    with caplog.at_level(logging.WARNING, logger="darkroom.data.sync"):
        check_complete(report, WHERE, 0.1)
    assert "2 of 30 objects" in caplog.text and "left out of this run" in caplog.text
    assert "failed 2 (left out of the manifest)" in report.summary()


def test_losses_over_the_threshold_stop():
    with pytest.raises(SyncIncomplete, match=r"4 of 30 .*max_failed_fraction 0.1 allows 3"):
        check_complete(_report(30, 4), WHERE, 0.1)
    check_complete(_report(30, 3), WHERE, 0.1)  # exactly the share allowed


def test_sync_incomplete_is_a_retriable_storage_error():
    # The Prefect task retries a StorageError, never a StorageSetupError.
    assert issubclass(SyncIncomplete, StorageError)
    assert not issubclass(SyncIncomplete, StorageSetupError)


def test_refusals_alone_are_not_retried_a_mix_is():
    from tasks.retry import NOT_RETRIED

    denied = _report(30, 0)
    for i in range(2):
        denied.add_failure(f"labeled/cat/{i}.jpg", StorageSetupError("access denied (403)"))
    with pytest.raises(SyncDenied, match="every failure was a refusal: not retried") as e:
        check_complete(denied, WHERE)
    assert isinstance(e.value, NOT_RETRIED) and isinstance(e.value, SyncIncomplete)

    denied.add_failure("labeled/cat/9.jpg", StorageError("connection reset"))  # may pass later
    with pytest.raises(SyncIncomplete, match="a retry downloads only the missing") as e:
        check_complete(denied, WHERE)
    assert not isinstance(e.value, SyncDenied) and not isinstance(e.value, NOT_RETRIED)


def test_reasons_are_bounded_but_every_failure_is_counted():
    report = _report(1000, MAX_FAILED_REASONS + 5)
    assert report.failed == len(report.failed_keys) == MAX_FAILED_REASONS + 5
    assert len(report.failed_reasons) == MAX_FAILED_REASONS


def test_the_default_config_accepts_no_loss():
    assert RetrainConfig().max_failed_fraction == 0.0
