"""Key images: a DICOM Secondary Capture per classified image, for people who look at a PACS.

An SR holds the scores, but no viewer draws an image-level classification. The key image
does, burned into pixels every viewer shows:

- the display preview (the radiograph windowed as its header says), shown with its long
  side 1024 pixels (:data:`READING_SIZE`; process_dicom.py stores it at the detail it
  decoded, never enlarged, so smaller previews are enlarged here), with the top
  finding's heatmap laid over the square the model saw, in colour (jet), with a
  legend;
- a panel of every label sorted by score, with bars and the 0.5 threshold marked;
- a banner: "AI RESULT - NOT FOR DIAGNOSTIC USE - colour shows model attention, not a
  localisation".

It is a Secondary Capture Image (PS3.3 A.8.1, built by ``highdicom.sc.SCImage``) with
Burned In Annotation YES, in its own series of the source's study, with Patient and Study
copied exactly as for the SR (:func:`cxrsr.sr.evidence.evidence_dataset`). Its SOP Instance UID names
one byte stream: generate_sr.py derives it from the file's complete bytes
(:func:`cxrsr.sr.uids.encode_with_content_uid`), before the SR that names it is built.
Everything it needs comes from the files process_dicom.py wrote beside the results (the
preview and heatmaps), so no image is decoded twice.
"""

from __future__ import annotations

import datetime
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.valuerep import DA, DT, TM

from cxrsr.dicomio.preview import read_png
from cxrsr.errors import InputError
from cxrsr.results import rounded_score
from cxrsr.sr import uids
from cxrsr.sr.times import document_time, state_time_zone

KEY_IMAGE_SERIES_NUMBER = 9902
#: Series Description (LO, at most 64 characters).
KEY_IMAGE_SERIES_DESCRIPTION = "AI key images - NOT FOR DIAGNOSTIC USE"
BANNER = "AI RESULT - NOT FOR DIAGNOSTIC USE - colour shows model attention, not a localisation"
MANUFACTURER = "cxrsr"
#: Modality of a Secondary Capture made by software (PS3.3 C.7.3.1.1.1: OT, "Other").
KEY_IMAGE_MODALITY = "OT"
SECONDARY_CAPTURE_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.7"

PANEL_WIDTH = 380
BANNER_HEIGHT = 40
BACKGROUND = (24, 24, 24)
TEXT = (235, 235, 235)
#: Largest weight of the heatmap colour over the radiograph (at the map's maximum).
OVERLAY_OPACITY = 0.55
#: The radiograph's long side in a key image, in pixels: readable on a PACS screen.
READING_SIZE = 1024


@cache
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


@cache
def jet_lut() -> np.ndarray:
    """The 'jet' colormap as a 256x3 uint8 table: blue (low) - cyan - yellow - red (high)."""
    x = np.linspace(0.0, 1.0, 256)

    def channel(centre: float) -> np.ndarray:
        return np.clip(1.5 - np.abs(4 * x - centre), 0.0, 1.0)

    rgb = np.stack([channel(3.0), channel(2.0), channel(1.0)], axis=1)
    return np.rint(rgb * 255).astype(np.uint8)


class KeyImageError(InputError):
    """A key image cannot be made: its preview or heatmap is missing, unreadable or changed."""


def _sha256_of(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as exc:
        raise KeyImageError(f"cannot read {path}: {exc.strerror or exc}") from exc


@dataclass(frozen=True)
class KeyImageRef:
    """One key image: what it shows, where that comes from, and its UIDs.

    Made in the main process, small enough to send to a worker process. The preview and
    heatmap are hashed here and checked again when drawn, so a file changed in between is
    an error, not a silently different picture. ``sop_instance_uid`` is the placeholder
    until the key image is encoded and its content UID is known.
    """

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    preview: str
    preview_sha256: str
    preview_crop: tuple[float, float, float, float]
    heatmap_label: str
    heatmap: str
    heatmap_sha256: str
    scores: tuple[tuple[str, float], ...]
    threshold: float

    @classmethod
    def from_entry(
        cls, entry: Mapping[str, Any], results_dir: Path, threshold: float, model: tuple[str, str]
    ) -> KeyImageRef | None:
        """The key image of a classified results entry; ``None`` without preview or heatmaps.

        ``model`` is (model id, weights SHA-256). A preview or heatmap that the entry names
        but that cannot be read raises :class:`KeyImageError`.
        """
        heatmaps = entry.get("heatmaps")
        if not entry.get("preview") or not isinstance(heatmaps, dict) or not heatmaps:
            return None
        scores = entry["scores"]
        try:
            label = max(heatmaps, key=lambda name: scores[name])
            x, y, width, height = (float(v) for v in entry["preview_crop"])
            preview, heatmap = results_dir / entry["preview"], results_dir / heatmaps[label]
        except (KeyError, TypeError, ValueError) as exc:
            raise KeyImageError(
                f"the results entry's heatmaps, preview or preview_crop are malformed ({exc!r})"
            ) from exc
        return cls(
            study_instance_uid=entry["study_instance_uid"],
            series_instance_uid=key_image_series_uid(entry["series_instance_uid"], *model),
            sop_instance_uid=uids.CONTENT_UID_PLACEHOLDER,
            preview=str(preview),
            preview_sha256=_sha256_of(preview),
            preview_crop=(x, y, width, height),
            heatmap_label=label,
            heatmap=str(heatmap),
            heatmap_sha256=_sha256_of(heatmap),
            scores=tuple((name, float(score)) for name, score in scores.items()),
            threshold=threshold,
        )

    def evidence_item(self) -> Dataset:
        """A Hierarchical SOP Instance Reference (PS3.3 C.17.2.1) to this key image."""
        instance = Dataset()
        instance.ReferencedSOPClassUID = SECONDARY_CAPTURE_IMAGE_STORAGE
        instance.ReferencedSOPInstanceUID = self.sop_instance_uid
        series = Dataset()
        series.SeriesInstanceUID = self.series_instance_uid
        series.ReferencedSOPSequence = [instance]
        study = Dataset()
        study.StudyInstanceUID = self.study_instance_uid
        study.ReferencedSeriesSequence = [series]
        return study

    def read(self) -> tuple[bytes, bytes]:
        """The preview and heatmap PNGs, checked against the digests taken when listed."""
        files = []
        for path, digest in (
            (self.preview, self.preview_sha256),
            (self.heatmap, self.heatmap_sha256),
        ):
            try:
                data = Path(path).read_bytes()
            except OSError as exc:
                raise KeyImageError(f"cannot read {path}: {exc.strerror or exc}") from exc
            if hashlib.sha256(data).hexdigest() != digest:
                raise KeyImageError(f"{path} changed while the key images were being made")
            files.append(data)
        return files[0], files[1]


def _png(data: bytes) -> Image.Image:
    return Image.fromarray(read_png(data))


def at_reading_size(
    preview: Image.Image, crop: tuple[float, float, float, float]
) -> tuple[Image.Image, tuple[float, float, float, float]]:
    """The preview enlarged to a long side of :data:`READING_SIZE`, and the crop with it.

    Bilinear, as process_dicom.py enlarged previews before it stored them at their decoded
    size. A preview already that large is left as it is.
    """
    scale = READING_SIZE / max(preview.size)
    if scale <= 1:
        return preview, crop
    size = (max(round(preview.width * scale), 1), max(round(preview.height * scale), 1))
    sx, sy = size[0] / preview.width, size[1] / preview.height
    x, y, width, height = crop
    enlarged = preview.resize(size, Image.Resampling.BILINEAR)
    return enlarged, (x * sx, y * sy, width * sx, height * sy)


@cache
def _jet_palette() -> list[int]:
    return [int(v) for v in jet_lut().ravel()]


def overlay(
    preview: Image.Image, crop: tuple[float, float, float, float], heat: Image.Image
) -> Image.Image:
    """RGB preview with ``heat`` (the model's input size, L) in jet colours over the crop square.

    The colour's weight grows with the heat, so where the model paid little attention
    the radiograph shows through unchanged. Pillow does the arithmetic (8-bit, in C):
    pasting through a mask blends ``colour * w + picture * (1 - w)``.
    """
    picture = preview.convert("RGB")
    x, y, width, height = crop
    left, top = round(x), round(y)
    right = min(round(x + width), preview.width)
    bottom = min(round(y + height), preview.height)
    heat_big = heat.resize((right - left, bottom - top), Image.Resampling.BILINEAR)
    weight = heat_big.point(_opacity_table())
    heat_big.putpalette(_jet_palette())  # now a palette image: heat -> jet colour
    picture.paste(heat_big.convert("RGB"), (left, top, right, bottom), weight)
    return picture


@cache
def _opacity_table() -> list[int]:
    return [round(v * OVERLAY_OPACITY) for v in range(256)]


@cache
def _text_sprite(
    text: str, size: int, fill: tuple[int, int, int], anchor: str
) -> tuple[Image.Image, int, int]:
    """``text`` rendered once (RGBA, anti-aliased) with its offset from the anchor point.

    Labels, scores and titles repeat from image to image; rendering each once keeps
    FreeType off the per-image path.
    """
    font = _font(size)
    left, top, right, bottom = (int(v) for v in font.getbbox(text, anchor=anchor))
    sprite = Image.new("RGBA", (max(right - left, 1), max(bottom - top, 1)), (*fill, 0))
    ImageDraw.Draw(sprite).text((-left, -top), text, font=font, fill=(*fill, 255), anchor=anchor)
    return sprite, left, top


def _text(
    canvas: Image.Image,
    xy: tuple[int, int],
    text: str,
    size: int,
    fill: tuple[int, int, int] = TEXT,
    anchor: str = "la",
) -> None:
    sprite, left, top = _text_sprite(text, size, fill, anchor)
    canvas.paste(sprite, (xy[0] + left, xy[1] + top), sprite)


@cache
def _background(width: int, height: int, panel_left: int) -> Image.Image:
    """Everything that does not depend on the image: banner, legend strip, titles."""
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    ImageDraw.Draw(canvas).rectangle((0, 0, width, BANNER_HEIGHT - 1), fill=(170, 20, 20))
    _text(canvas, (10, BANNER_HEIGHT // 2), BANNER, 19, (255, 255, 255), "lm")
    left, top = panel_left + 16, BANNER_HEIGHT + 14
    _text(canvas, (left, top), "Colour: model attention for", 14)
    bar_width = PANEL_WIDTH - 40
    legend = np.repeat(jet_lut()[None, :, :], 12, axis=0)
    strip = Image.fromarray(legend).resize((bar_width, 12), Image.Resampling.BILINEAR)
    canvas.paste(strip, (left, top + 44))
    _text(canvas, (left, top + 60), "low", 14)
    _text(canvas, (left + bar_width, top + 60), "high", 14, anchor="ra")
    _text(canvas, (left, top + 100), "Scores (0.5 = decision threshold)", 16)
    return canvas


@cache
def _background_pixels(width: int, height: int, panel_left: int) -> np.ndarray:
    """:func:`_background` as an array, converted once (not read-only: a cached copy)."""
    return np.array(_background(width, height, panel_left))


def render(item: KeyImageRef) -> np.ndarray:
    """The key image's pixels: RGB uint8, banner on top, radiograph left, panel right.

    The radiograph and its overlay are Pillow's work (a few calls on whole images); the
    panel is put together with numpy from pieces drawn once (:func:`_text_block`). Each
    Pillow call lets go of the GIL and must win it back: drawn on its own thread while
    the SR is encoded, 40 small pastes a key image cost more waiting than drawing
    (measured: 20 ms on the thread for 10 ms of work).
    """
    preview, heatmap = item.read()
    picture = overlay(*at_reading_size(_png(preview), item.preview_crop), _png(heatmap))
    height = BANNER_HEIGHT + max(picture.height, 720)
    canvas = _background_pixels(picture.width + PANEL_WIDTH, height, picture.width).copy()
    canvas[BANNER_HEIGHT : BANNER_HEIGHT + picture.height, : picture.width] = np.asarray(picture)
    _panel(canvas, item, picture.width + 16, BANNER_HEIGHT + 14)
    return canvas


@cache
def _text_block(
    text: str, size: int, fill: tuple[int, int, int], anchor: str
) -> tuple[np.ndarray, int, int]:
    """``text`` drawn once over :data:`BACKGROUND` (RGB), with its offset from the anchor.

    Exactly what pasting the anti-aliased sprite onto the panel's plain background gives
    (Pillow blends it here, once), so the panel can be assembled by copying arrays.
    """
    sprite, left, top = _text_sprite(text, size, fill, anchor)
    block = Image.new("RGB", sprite.size, BACKGROUND)
    block.paste(sprite, (0, 0), sprite)
    return np.asarray(block), left, top


def _put_text(
    canvas: np.ndarray,
    xy: tuple[int, int],
    text: str,
    size: int,
    fill: tuple[int, int, int] = TEXT,
    anchor: str = "la",
) -> None:
    """:func:`_text` for a spot of plain background on a numpy canvas."""
    block, left, top = _text_block(text, size, fill, anchor)
    x, y = xy[0] + left, xy[1] + top
    height, width = block.shape[:2]
    canvas[y : y + height, x : x + width] = block


def _shown(score: float, threshold: float) -> str:
    """A score as the panel shows it: two decimals, never rounded across the threshold."""
    return f"{rounded_score(score, threshold, 2):.2f}"


def _panel(canvas: np.ndarray, item: KeyImageRef, left: int, top: int) -> None:
    """The overlay's label, then every label sorted by score with bars and the threshold."""
    score_of = dict(item.scores)
    label = f"{item.heatmap_label} (score {_shown(score_of[item.heatmap_label], item.threshold)})"
    _put_text(canvas, (left, top + 18), label, 16, (255, 210, 80))
    bar_left, bar_width = left, PANEL_WIDTH - 40
    y = top + 128
    row = 30
    threshold_x = bar_left + round(bar_width * item.threshold)
    first = y
    for name, score in sorted(item.scores, key=lambda pair: (-pair[1], pair[0])):
        found = score >= item.threshold
        _put_text(canvas, (left, y), name, 14)
        _put_text(canvas, (left + bar_width, y), _shown(score, item.threshold), 14, anchor="ra")
        bar_top = y + 17
        # As ImageDraw.rectangle draws them: both corners inclusive.
        canvas[bar_top : bar_top + 9, bar_left : bar_left + bar_width + 1] = (60, 60, 60)
        end = bar_left + round(bar_width * min(max(score, 0.0), 1.0))
        if end > bar_left:
            colour = (230, 80, 60) if found else (150, 150, 150)
            canvas[bar_top : bar_top + 9, bar_left : end + 1] = colour
        y += row
    # ImageDraw.line of width 2 from (x, first - 4) to (x, y): columns x and x + 1.
    canvas[first - 4 : y + 1, threshold_x : threshold_x + 2] = (255, 255, 255)
    _put_text(canvas, (threshold_x, y + 2), "threshold", 14, anchor="ma")


def key_image_series_uid(source_series_instance_uid: str, model_id: str, weights: str) -> str:
    """Series Instance UID of the key images of one source series for one model."""
    return uids.derive_uid("key-image-series", [source_series_instance_uid, model_id, weights])


def build_key_image(
    evidence: Dataset,
    item: KeyImageRef,
    instance_number: int,
    content_datetime: datetime.datetime,
    pixels: np.ndarray | None = None,
) -> Dataset:
    """The Secondary Capture dataset; ``evidence`` is the SR's cleaned source header.

    Its times follow the SR's policy (:mod:`cxrsr.sr.times`): stated in the source's
    offset, which it carries, or as UTC clock values with no offset when the source has
    none; never in the host's zone.
    """
    import highdicom as hd
    from pydicom.uid import ExplicitVRLittleEndian

    if pixels is None:
        pixels = render(item)
    when = document_time(content_datetime, evidence)
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=evidence,
        pixel_array=pixels,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=item.series_instance_uid,
        series_number=KEY_IMAGE_SERIES_NUMBER,
        sop_instance_uid=item.sop_instance_uid,
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        # highdicom insists on an orientation for the PATIENT coordinate system; the
        # picture is a composite (radiograph and panel), so it is written empty below.
        patient_orientation=("L", "F"),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description=KEY_IMAGE_SERIES_DESCRIPTION,
    )
    # Type 2C (PS3.3 C.7.6.1): present, empty: the picture is not a patient-oriented image.
    sc["PatientOrientation"].value = None
    # General Series Laterality is Type 2C; dciodvfy cannot evaluate its condition for a
    # Secondary Capture and requires it: present and empty (unknown, not a paired organ).
    sc.add_new("Laterality", "CS", None)
    sc.BurnedInAnnotation = "YES"
    sc.RecognizableVisualFeatures = "YES"
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.DerivationDescription = (
        f"AI classification result (heatmap: {item.heatmap_label}) burned into a display preview"
    )
    sc.SoftwareVersions = uids.software_versions()
    # Everything highdicom stamps from the clock gets the classification's time instead,
    # so the same results give the same bytes (the UID names one byte stream).
    sc.ContentDate = sc.DateOfSecondaryCapture = DA(when.date())
    sc.ContentTime = sc.TimeOfSecondaryCapture = TM(when.time().replace(tzinfo=None))
    for equipment in sc.get("ContributingEquipmentSequence", []):
        if "ContributionDateTime" in equipment:
            equipment.ContributionDateTime = DT(when)
    state_time_zone(sc, evidence)
    for keyword in ("InstanceCreationDate", "InstanceCreationTime"):
        if keyword in sc:
            delattr(sc, keyword)
    source = Dataset()
    source.ReferencedSOPClassUID = evidence.SOPClassUID
    source.ReferencedSOPInstanceUID = evidence.SOPInstanceUID
    sc.SourceImageSequence = [source]
    return sc
