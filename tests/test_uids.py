"""Deterministic UIDs: valid under PS3.5 9.1, stable, and distinct where they must be."""

from __future__ import annotations

import pytest

from cxrsr import uids


@pytest.mark.parametrize(
    "value, valid",
    [
        ("1.2.840.10008.5.1.4.1.1.88.34", True),
        ("2.25.0", True),
        ("2.25.012", False),  # leading zero in a component
        ("1.2.", False),
        (".1.2", False),
        ("1..2", False),
        ("1.2a.3", False),
        ("1." + "2" * 62, True),  # 64 characters
        ("1." + "2" * 63, False),  # 65 characters
    ],
)
def test_is_valid_uid_follows_ps3_5(value: str, valid: bool) -> None:
    assert uids.is_valid_uid(value) is valid


def test_derived_uids_are_valid_stable_and_separate() -> None:
    series = uids.sr_series_uid("1.2.3", "densenet121-res224-all", "ab" * 32)
    assert uids.is_valid_uid(series)
    assert series.startswith("2.25.")
    assert series == uids.sr_series_uid("1.2.3", "densenet121-res224-all", "ab" * 32)
    # Other weights, another series; same inputs for another purpose, another UID.
    assert series != uids.sr_series_uid("1.2.3", "densenet121-res224-all", "cd" * 32)
    assert series != uids.derive_uid("sr-instance", ["1.2.3", "densenet121-res224-all", "ab" * 32])
    # Parts are joined unambiguously.
    assert uids.derive_uid("x", ["1.2", "3"]) != uids.derive_uid("x", ["1", "2.3"])


def test_known_value_does_not_drift() -> None:
    """A change of the derivation would re-key every SR already in a PACS: pin one value."""
    assert str(uids.NAMESPACE) == "00d085d2-e3ac-56a0-b2c4-e3cf00a6d34c"
    assert (
        uids.derive_uid("sr-series", ["1.2.3", "m", "w"])
        == "2.25.226272037253488773671072772832509059222"
    )
