"""The HTML report beside the results file, rendered by a real headless Chromium.

The results come from process_dicom.py on corpus files (random weights: the scores are
meaningless, so the tests compare the page with the results file, never with clinical
values), and the Orthanc links are checked against a real Orthanc.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import requests
from browser import dump_dom
from conftest import orthanc_env, run_script
from PIL import Image
from pydicom.uid import generate_uid
from report_fixtures import add_pictures

from cxrsr.pacs.local_orthanc import LocalOrthanc
from cxrsr.report import REPORT_NAME, render_report, write_report
from cxrsr.report.links import explorer_study_url, orthanc_study_id, public_base_url

SOURCES = [
    "cxr11_siim_cr_jpeg8.dcm",  # MONOCHROME2, PatientID set
    "cxr08_panimg_CR-MONO1-10-chest_withmeta.dcm",  # MONOCHROME1, no PatientID
    "edge_vet_dog_dx_thorax_small.dcm",  # not square
    "bad_ct_small.dcm",  # skipped
    "edge_cxr_corrupt_j2k_966.dcm",  # failed
]


class PageReader(HTMLParser):
    """What a reader of the page sees: cards with their score rows, pictures, the
    not-classified table, counts and model facts; and every element name used."""

    def __init__(self) -> None:
        super().__init__()
        self.cards: list[dict[str, Any]] = []
        self.images: list[dict[str, str]] = []
        self.elements: set[str] = set()
        self.links: list[str] = []
        self.counts: dict[str, str] = {}
        self.facts: dict[str, str] = {}
        self.others: list[list[str]] = []
        self.meta_csp = ""
        self._text_target: tuple[str, Any] | None = None
        self._cell: list[str] | None = None
        self._other_row: list[str] | None = None
        self._in_others = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        self.elements.add(tag)
        if tag == "meta" and a.get("http-equiv") == "Content-Security-Policy":
            self.meta_csp = a["content"]
        if tag == "article":
            self.cards.append({"sop": a.get("data-sop-instance-uid"), "rows": [], "pictures": []})
        elif tag == "tr" and "data-score" in a and self.cards:
            self.cards[-1]["rows"].append([a["data-label"], float(a["data-score"]), ""])
        elif tag == "td" and a.get("class") == "value" and self.cards:
            self._text_target = ("value", self.cards[-1]["rows"][-1])
        elif tag == "img":
            self.images.append(a)
            if self.cards:
                self.cards[-1]["pictures"].append(a)
        elif tag == "a":
            self.links.append(a.get("href", ""))
        elif tag == "b" and "data-count" in a:
            self._text_target = ("count", a["data-count"])
        elif tag == "dd" and "data-fact" in a:
            self._text_target = ("fact", a["data-fact"])
        elif tag == "section" and a.get("id") == "not-classified":
            self._in_others = True
        elif tag == "tr" and self._in_others:
            self._other_row = []
        elif tag == "td" and self._other_row is not None:
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "b", "dd"):
            self._text_target = None
        if tag == "td" and self._cell is not None and self._other_row is not None:
            self._other_row.append("".join(self._cell))
            self._cell = None
        if tag == "tr" and self._other_row:
            self.others.append(self._other_row)
            self._other_row = None
        if tag == "section":
            self._in_others = False

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)
        if self._text_target is None:
            return
        kind, target = self._text_target
        if kind == "value":
            target[2] += data
        elif kind == "count":
            self.counts[target] = self.counts.get(target, "") + data
        else:
            self.facts[target] = self.facts.get(target, "") + data


def read_page(html: str) -> PageReader:
    reader = PageReader()
    reader.feed(html)
    reader.close()
    return reader


def coloured(pixels: np.ndarray) -> int:
    """How many pixels are far from grey (heatmap colours, bars, banner, links)."""
    return int(np.count_nonzero(pixels.max(axis=-1) - pixels.min(axis=-1) > 40))


def copy_with_new_uids(source: Path, target: Path) -> None:
    ds = pydicom.dcmread(source, force=True)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = generate_uid()
    if "MediaStorageSOPInstanceUID" in ds.file_meta:
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(target)


@pytest.fixture(scope="module")
def processed(
    corpus_dir: Path, weights_cache_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A results file from process_dicom.py on corpus copies, with pictures (see
    report_fixtures) when process_dicom.py did not write them."""
    folder = tmp_path_factory.mktemp("report")
    data = folder / "data"
    data.mkdir()
    for name in SOURCES:
        copy_with_new_uids(corpus_dir / name, data / name)
    results = folder / "output" / "results.json"
    done = run_script(
        "process_dicom.py", data, "-o", results, "--cache-dir", weights_cache_dir, "-q"
    )
    assert done.returncode == 1, done.stderr  # the corrupt JPEG 2000 fails, by design
    add_pictures(results)
    return results


def test_generate_sr_writes_a_report_that_chromium_renders_with_the_results_values(
    processed: Path, tmp_path: Path
) -> None:
    results_path = processed
    env = dict(os.environ, ORTHANC_URL="http://alice:s3cret@127.0.0.1:8042/")
    done = run_script(
        "generate_sr.py", "--results", results_path, "--output-dir", tmp_path / "sr", env=env
    )
    assert done.returncode == 0, done.stderr
    report = results_path.parent / REPORT_NAME
    assert report.is_file()
    assert f"I: report: {report}" in done.stderr
    results = json.loads(results_path.read_text(encoding="utf-8"))
    classified = [e for e in results["images"] if e["status"] == "classified"]
    not_classified = [e for e in results["images"] if e["status"] != "classified"]
    assert len(classified) == 3 and len(not_classified) == 2

    # The screenshot comes from the script that makes the README's docs/report.png.
    shot = tmp_path / "report.png"
    made = run_script("scripts/report_screenshot.py", report, shot, "--height", "2400")
    assert made.returncode == 0, made.stderr
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert pixels.std() > 20, "the screenshot is blank"
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 1000, "the screenshot is blank"
    # The heatmaps are on screen: the same page without them has far fewer coloured pixels.
    bare = json.loads(results_path.read_text(encoding="utf-8"))
    for entry in bare["images"]:
        entry.pop("heatmaps", None)
    bare_report = tmp_path / "bare.html"
    bare_report.write_text(render_report(bare, results_path.parent).html, encoding="utf-8")
    bare_shot = tmp_path / "bare.png"
    made = run_script("scripts/report_screenshot.py", bare_report, bare_shot, "--height", "2400")
    assert made.returncode == 0, made.stderr
    bare_pixels = np.asarray(Image.open(bare_shot).convert("RGB")).astype(int)
    assert coloured(pixels) > coloured(bare_pixels) + 5000, "no heatmap colour on screen"

    page = read_page(dump_dom(report.as_uri()))
    # The same labels and scores as the results file, card by card, sorted by score.
    assert [card["sop"] for card in page.cards] == [e["sop_instance_uid"] for e in classified]
    for card, entry in zip(page.cards, classified, strict=True):
        expected = sorted(entry["scores"].items(), key=lambda item: (-item[1], item[0]))
        assert [(label, score) for label, score, _ in card["rows"]] == expected
        assert [text for _, _, text in card["rows"]] == [f"{s:.3f}" for _, s in expected]
        # One large picture and one small one per further heatmap, all inlined.
        assert len(card["pictures"]) == max(1, len(entry["heatmaps"]))
    assert page.counts == {"images": "5", "classified": "3", "skipped": "1", "failed": "1"}
    assert sorted(page.others) == sorted(
        [e["status"], e["path"], e["reason"]] for e in not_classified
    )
    assert page.facts["weights SHA-256"] == results["model"]["weights_sha256"]
    assert page.facts["torchxrayvision"] == results["model"]["torchxrayvision"]
    assert page.facts["score"] == results["model"]["score_kind"]
    # Self-contained: no scripts, no stylesheets, every picture inline, and a policy that
    # makes the browser refuse anything else.
    assert {"script", "link", "iframe", "object"}.isdisjoint(page.elements)
    assert page.images and all(i["src"].startswith("data:image/") for i in page.images)
    assert page.meta_csp.startswith("default-src 'none'")
    # Links into Orthanc Explorer, one per card, without the password from ORTHANC_URL.
    assert page.links == [
        explorer_study_url("http://127.0.0.1:8042", e["patient_id"], e["study_instance_uid"])
        for e in classified
    ]
    assert "s3cret" not in report.read_text(encoding="utf-8")


def test_the_heatmap_lies_over_the_models_square_only(processed: Path) -> None:
    results_path = processed
    document = json.loads(results_path.read_text(encoding="utf-8"))
    entry = next(
        e for e in document["images"] if e["path"].endswith("edge_vet_dog_dx_thorax_small.dcm")
    )
    page = read_page(render_report(document, results_path.parent).html)
    card = next(c for c in page.cards if c["sop"] == entry["sop_instance_uid"])
    main = card["pictures"][0]["src"]
    picture = np.asarray(
        Image.open(io.BytesIO(base64.b64decode(main.split(",", 1)[1]))).convert("RGB")
    ).astype(int)
    preview = np.asarray(Image.open(results_path.parent / entry["preview"]))
    scale = picture.shape[1] / preview.shape[1]  # the card may show the preview smaller
    assert scale <= 1 and abs(picture.shape[0] - preview.shape[0] * scale) <= 1
    # The page shows it with a long side of 720 px, whatever size the preview was stored at.
    shown = int(card["pictures"][0]["width"]), int(card["pictures"][0]["height"])
    assert (
        max(shown) == 720 and abs(shown[0] / shown[1] - picture.shape[1] / picture.shape[0]) < 0.01
    )
    x, y, width, height = (round(v * scale) for v in entry["preview_crop"])
    colour = picture.max(axis=2) - picture.min(axis=2)
    inside = np.zeros(colour.shape, dtype=bool)
    inside[y + 2 : y + height - 2, x + 2 : x + width - 2] = True
    outside = np.ones(colour.shape, dtype=bool)  # resampling blurs the square's edge
    outside[max(y - 2, 0) : y + height + 2, max(x - 2, 0) : x + width + 2] = False
    assert outside.sum() > 1000  # the image is not square: there is an outside
    assert (colour[inside] > 30).mean() > 0.1  # the blob, in colour
    assert colour[outside].max() < 16  # grey outside the square, but for JPEG noise


def test_values_from_headers_and_results_are_escaped(processed: Path, tmp_path: Path) -> None:
    document = json.loads(processed.read_text(encoding="utf-8"))
    entry = next(e for e in document["images"] if e["status"] == "classified")
    hostile = '<script>alert("x")</script>&amp;'
    entry["patient_id"] = hostile
    entry["warnings"] = [f"<b>{hostile}</b>"]
    label = next(iter(entry["scores"]))
    entry["scores"][f'{label}"><img src=x>'] = 0.25
    document["images"].append(
        {"path": f"data/<u>{hostile}.dcm", "status": "failed", "reason": hostile}
    )
    html = render_report(document, processed.parent, orthanc_url="http://127.0.0.1:8042").html
    page = read_page(html)
    assert "script" not in page.elements and "u" not in page.elements
    assert all(i["src"].startswith("data:") for i in page.images)  # no injected <img src=x>
    assert any(row[0] == f'{label}"><img src=x>' for row in page.cards[0]["rows"])
    assert ["failed", f"data/<u>{hostile}.dcm", hostile] in page.others
    assert hostile not in html and "&lt;script&gt;" in html


def test_results_without_pictures_still_render_and_say_why(processed: Path, tmp_path: Path) -> None:
    document = json.loads(processed.read_text(encoding="utf-8"))
    first, second = [e for e in document["images"] if e["status"] == "classified"][:2]
    for key in ("preview", "preview_crop", "heatmaps"):
        first.pop(key)
    folder = tmp_path / "moved"
    shutil.copytree(processed.parent, folder)
    (folder / second["preview"]).unlink()
    document["complete"] = False  # process_dicom.py was interrupted
    results = folder / "results.json"
    results.write_text(json.dumps(document), encoding="utf-8")
    target, report = write_report(document, results)
    html = target.read_text(encoding="utf-8")
    assert "No picture: this results file names no preview or heatmap" in html
    assert "Picture not shown" in html
    assert "process_dicom.py was interrupted" in html
    assert report.problems == [
        f"{second['path']}: picture not shown: "
        f"{folder / second['preview']}: cannot read the picture "
        f"([Errno 2] No such file or directory: '{folder / second['preview']}')"
    ]
    page = read_page(html)
    assert len(page.cards) == 3 and all(card["rows"] for card in page.cards)
    assert page.links == []  # no Orthanc URL known, no link


def test_orthanc_link_needs_no_password_and_keeps_the_path() -> None:
    assert public_base_url("http://u:p@127.0.0.1:8042/") == "http://127.0.0.1:8042"
    assert (
        public_base_url("https://pacs.example.org/orthanc/") == "https://pacs.example.org/orthanc"
    )
    assert public_base_url("http://u@[::1]:8042") == "http://[::1]:8042"
    with pytest.raises(ValueError, match="not an absolute URL"):
        public_base_url("127.0.0.1:8042")


def test_study_ids_computed_offline_are_orthancs_own(
    orthanc: LocalOrthanc, corpus_dir: Path, tmp_path: Path
) -> None:
    """Orthanc's public study ID, with and without PatientID, against a real Orthanc."""
    auth = (orthanc.username, orthanc.password)
    for name in ("cxr11_siim_cr_jpeg8.dcm", "cxr08_panimg_CR-MONO1-10-chest_withmeta.dcm"):
        copy = tmp_path / name
        copy_with_new_uids(corpus_dir / name, copy)
        ds = pydicom.dcmread(copy)
        stored = requests.post(
            f"{orthanc.url}/instances", data=copy.read_bytes(), auth=auth, timeout=30
        )
        assert stored.status_code == 200, stored.text
        study = requests.get(
            f"{orthanc.url}/instances/{stored.json()['ID']}/study", auth=auth, timeout=10
        ).json()
        patient_id = ds.get("PatientID", "")
        assert orthanc_study_id(patient_id, ds.StudyInstanceUID) == study["ID"]
        assert stored.json()["ParentStudy"] == study["ID"]
    assert "PatientID" not in pydicom.dcmread(
        corpus_dir / "cxr08_panimg_CR-MONO1-10-chest_withmeta.dcm"
    )
    # The link opens the study's page: Orthanc Explorer asks the REST API for this ID.
    url = explorer_study_url(orthanc.url, patient_id, ds.StudyInstanceUID)
    study_id = url.rsplit("uuid=", 1)[1]
    answer = requests.get(f"{orthanc.url}/studies/{study_id}", auth=auth, timeout=10)
    assert answer.json()["MainDicomTags"]["StudyInstanceUID"] == ds.StudyInstanceUID
    assert orthanc_env(orthanc)["ORTHANC_URL"] == orthanc.url


def test_worker_processes_make_the_same_page(processed: Path) -> None:
    document = json.loads(processed.read_text(encoding="utf-8"))
    classified = [e for e in document["images"] if e["status"] == "classified"]
    document["images"] = classified * 12  # 36 cards: enough for two workers
    one = render_report(document, processed.parent, "http://127.0.0.1:8042", jobs=1)
    two = render_report(document, processed.parent, "http://127.0.0.1:8042", jobs=2)
    assert one.html == two.html and len(read_page(two.html).cards) == 36
