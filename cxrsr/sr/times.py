"""The time policy of every object this project writes (SR and key image alike).

Rule: every date and time an object states comes from the results file (``classified_at``,
an instant in UTC) and from the source header, never from the machine writing it. The
same results give the same bytes on every host, whatever its time zone (``TZ``), so a
rerun elsewhere names the same instances (:mod:`cxrsr.sr.uids`).

Timezone Offset From UTC applies to every date and time of an instance (PS3.3
C.12.1.1.8), and an object copies its source's Study Date/Time and Patient's Birth Date
as they are. So:

- a source with a valid offset: the object carries that offset, and states its own times
  (Content Date/Time, Contribution DateTime, ...) in it;
- a source without one (or with an invalid one, which the builders drop): its times are in
  a local zone nobody stated. The object states no offset either ("+0000" beside the
  source's local times would declare them UTC, which they are not), and gives its own
  times as UTC clock values, with no offset suffix on DT values. The host's zone is no
  better guess of the site's than UTC, and it would make the bytes depend on the host.
"""

from __future__ import annotations

import datetime
import re

from pydicom.dataset import Dataset

#: PS3.3 C.12.1.1.8: "&ZZXX", a sign, hours and minutes. Offsets in use run from -12:00
#: to +14:00.
_UTC_OFFSET = re.compile(r"([+-])([0-9]{2})([0-5][0-9])")
_LARGEST_OFFSET_MINUTES = {"+": 14 * 60, "-": 12 * 60}


def utc_offset(dataset: Dataset) -> datetime.timezone | None:
    """The dataset's Timezone Offset From UTC as a time zone; ``None`` if absent or invalid."""
    value = dataset.get("TimezoneOffsetFromUTC")
    match = _UTC_OFFSET.fullmatch(str(value or "").strip())
    if match is None:
        return None
    sign, hours, minutes = match.groups()
    total = int(hours) * 60 + int(minutes)
    if total > _LARGEST_OFFSET_MINUTES[sign]:
        return None
    return datetime.timezone(datetime.timedelta(minutes=-total if sign == "-" else total))


def document_time(moment: datetime.datetime, source: Dataset) -> datetime.datetime:
    """``moment`` as an object made from ``source`` states it, to the second.

    In the source's offset (an aware value: a DT made from it ends in that offset); without
    one, the UTC clock value, naive (a DT made from it has no suffix). A naive ``moment``
    is taken as UTC, as ``classified_at`` is. Never the host's zone.
    """
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    offset = utc_offset(source)
    if offset is None:
        return moment.astimezone(datetime.UTC).replace(microsecond=0, tzinfo=None)
    return moment.astimezone(offset).replace(microsecond=0)


def state_time_zone(dataset: Dataset, source: Dataset) -> None:
    """Give ``dataset`` its source's Timezone Offset From UTC, or none (see the module)."""
    if utc_offset(source) is not None:
        dataset.TimezoneOffsetFromUTC = source.TimezoneOffsetFromUTC
    elif "TimezoneOffsetFromUTC" in dataset:
        del dataset.TimezoneOffsetFromUTC
