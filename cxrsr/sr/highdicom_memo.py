"""One memo for highdicom: "does this SOP Class hold pixel data?" answered once per class.

highdicom 0.28 asks ``_standard_utils.does_iod_have_pixel_data`` for every SR it builds
(of the source image, to describe its acquisition in Contributing Equipment) and for
every Secondary Capture (of the image it is made from), and answers by walking every
module of the IOD through the standard's tables: 0.7 ms for Computed Radiography, 5 ms
for Digital X-Ray For Presentation (measured here), against about 15 ms for a whole SR.
generate_sr.py asks it twice per image, with the GIL held.

The answer depends only on the SOP Class UID and the tables shipped inside highdicom, so
the function is memoised where highdicom's Contributing Equipment code looks it up. A
highdicom release that moves or renames it is left alone: slower, never wrong.
``tests/test_sr.py`` checks that SRs and key images are byte for byte those of the
unpatched library.
"""

from __future__ import annotations

import functools


def memoise_pixel_data_check() -> bool:
    """Memoise the lookup in ``highdicom.base_content``; True when it is (now or before)."""
    try:
        from highdicom import base_content
    except ImportError:
        return False
    original = getattr(base_content, "does_iod_have_pixel_data", None)
    if original is None or not callable(original):
        return False
    if not hasattr(original, "cache_info"):
        base_content.does_iod_have_pixel_data = functools.cache(original)
    return True
