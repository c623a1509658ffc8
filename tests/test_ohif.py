"""OHIF v3 shows what the pipeline stored, in a real headless Chromium.

The viewer is npm's prebuilt ``@ohif/app``, served by
``tools.ohif`` in front of a real Orthanc with Debian's DICOMweb plugin; playwright
drives the system Chromium. What the viewport shows is judged from screenshots: an RGB
Secondary Capture built here proves the plumbing, and the key image generate_sr.py
writes must show its overlay colours.

``npm pack`` of the viewer is the one registry fetch the tests make. It is cached in the
project's git-ignored ``.cache/cxrsr-test/`` (the unpacked viewer, and npm's own cache in
its ``npm/``), so a second run needs no network.
"""

from __future__ import annotations

import http.client
import io
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
import requests
from browser import chromium_binary
from conftest import missing_prerequisite, orthanc_env, run_script
from PIL import Image
from pydicom.uid import generate_uid
from test_report import copy_with_new_uids

from cxrsr.config import PROJECT_ROOT
from cxrsr.errors import PipelineError
from cxrsr.pacs.local_orthanc import DICOMWEB_PLUGIN, LocalOrthanc
from tools.ohif import OhifServer, ensure_ohif_dist

#: The unpacked viewer and npm's cache, inside the project (git-ignored): see above.
CACHE = PROJECT_ROOT / ".cache" / "cxrsr-test"
#: WebGL in headless Chromium needs SwiftShader (../shared/docs/ohif.md).
BROWSER_ARGS = ["--no-sandbox", "--use-angle=swiftshader", "--enable-unsafe-swiftshader"]
SECONDARY_CAPTURE_CLASSES = ("1.2.840.10008.5.1.4.1.1.7",)  # and its multi-frame .7.x


@pytest.fixture(scope="module")
def ohif_dist() -> Path:
    try:
        return ensure_ohif_dist(CACHE)
    except PipelineError as exc:
        missing_prerequisite(f"no OHIF viewer: {exc}")
        raise


@pytest.fixture(scope="module")
def dicomweb_orthanc(
    orthanc_binary: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalOrthanc]:
    if not DICOMWEB_PLUGIN.is_file():
        missing_prerequisite(
            "Orthanc's DICOMweb plugin missing (test.sh installs orthanc-dicomweb)"
        )
    server = LocalOrthanc(
        tmp_path_factory.mktemp("orthanc-dicomweb"),
        "cxrsr-test",
        "ohif-test-pw",
        binary=orthanc_binary,
        dicomweb=True,
    )
    with server:
        yield server


@pytest.fixture(scope="module")
def ohif(ohif_dist: Path, dicomweb_orthanc: LocalOrthanc) -> Iterator[OhifServer]:
    server = OhifServer(ohif_dist, dicomweb_orthanc.url)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture(scope="module")
def browser(dicomweb_orthanc: LocalOrthanc) -> Iterator[Any]:
    """The system Chromium driven by playwright (its own browser download is not needed)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing_prerequisite("playwright not installed (requirements-dev.txt)")
    with sync_playwright() as driver:
        chromium = driver.chromium.launch(executable_path=chromium_binary(), args=BROWSER_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


def displayed_area(image_shape: tuple[int, ...], viewport_shape: tuple[int, ...]) -> float:
    """Screen pixels an image covers when fitted into the viewport (OHIF's initial zoom)."""
    scale = min(viewport_shape[0] / image_shape[0], viewport_shape[1] / image_shape[1])
    return scale * scale * image_shape[0] * image_shape[1]


def strongly_coloured(pixels: np.ndarray) -> np.ndarray:
    """Pixels far from grey: a heatmap overlay, a legend, coloured bars."""
    rgb = pixels.astype(int)
    return rgb.max(axis=-1) - rgb.min(axis=-1) > 80


def assert_colours_shown(stored: np.ndarray, shown: np.ndarray) -> None:
    """The share of strongly coloured pixels the image stores appears on the screen, fitted
    to the viewport (a grey or absent image would show none)."""
    assert stored.ndim == 3, "not a colour image"
    coloured = strongly_coloured(stored).mean()
    assert coloured > 0.002, "the image has no colour overlay"
    seen = strongly_coloured(shown).sum()
    expected = coloured * displayed_area(stored.shape, shown.shape)
    assert seen > 0.7 * expected, (seen, expected)


def upload(server: LocalOrthanc, path: Path) -> None:
    answer = requests.post(
        f"{server.url}/instances",
        data=path.read_bytes(),
        auth=(server.username, server.password),
        timeout=60,
    )
    assert answer.status_code == 200, answer.text


def viewport_pixels(
    browser: Any, server: LocalOrthanc, url: str, timeout: float = 90
) -> np.ndarray:
    """The viewport once the image has settled: non-black and three identical captures in a
    row, polled every 0.5 s (virtual time does not wait for fetches or WebAssembly)."""
    context = browser.new_context(
        viewport={"width": 1280, "height": 960},
        http_credentials={"username": server.username, "password": server.password},
    )
    try:
        page = context.new_page()
        page.goto(url)
        deadline = time.monotonic() + timeout
        previous, same = b"", 0
        while time.monotonic() < deadline:
            time.sleep(0.5)
            element = page.query_selector(".viewport-element")
            if element is None:
                continue
            shot = element.screenshot()
            pixels = np.asarray(Image.open(io.BytesIO(shot)).convert("RGB"))
            if pixels.max() == 0:
                continue
            same = same + 1 if shot == previous else 0
            previous = shot
            if same >= 2:
                return pixels
        pytest.fail(f"the viewport did not settle within {timeout:.0f} s at {url}")
    finally:
        context.close()


@pytest.mark.slow
def test_ohif_shows_an_rgb_secondary_capture_in_its_colours(
    ohif: OhifServer, dicomweb_orthanc: LocalOrthanc, browser: Any, tmp_path: Path
) -> None:
    pixels = np.full((1024, 1024, 3), 96, dtype=np.uint8)
    pixels[362:662, 362:662] = (255, 0, 0)
    study, series = generate_uid(), generate_uid()
    sc = hd.sc.SCImage(
        pixel_array=pixels,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        study_instance_uid=study,
        series_instance_uid=series,
        sop_instance_uid=generate_uid(),
        series_number=1,
        instance_number=1,
        manufacturer="cxrsr tests",
        patient_id="OHIF-TEST",
        patient_orientation=("L", "P"),
    )
    path = tmp_path / "red-square.dcm"
    sc.save_as(path)
    upload(dicomweb_orthanc, path)
    shown = viewport_pixels(
        browser,
        dicomweb_orthanc,
        f"{ohif.url}/viewer?StudyInstanceUIDs={study}&initialSeriesInstanceUID={series}",
    )
    # The square covers 300x300 of 1024x1024 stored pixels; fitted into the viewport it
    # must cover that share of the image's screen area in exact red (its edges blend).
    expected = displayed_area(pixels.shape, shown.shape) * (300 * 300) / (1024 * 1024)
    red = np.all(shown == (255, 0, 0), axis=-1).sum()
    assert 0.85 * expected < red < 1.05 * expected, (red, expected)
    grey = np.all(shown == (96, 96, 96), axis=-1).sum()
    assert grey > 0.85 * displayed_area(pixels.shape, shown.shape) - expected
    assert_colours_shown(pixels, shown)  # the check the key image gets, on a known image


def test_the_login_is_orthancs(ohif: OhifServer, dicomweb_orthanc: LocalOrthanc) -> None:
    assert requests.get(f"{ohif.url}/", timeout=10).status_code == 401
    wrong = requests.get(f"{ohif.url}/dicom-web/studies", auth=("cxrsr-test", "no"), timeout=10)
    assert wrong.status_code == 401
    auth = (dicomweb_orthanc.username, dicomweb_orthanc.password)
    assert requests.get(f"{ohif.url}/dicom-web/studies", auth=auth, timeout=10).status_code == 200
    config = requests.get(f"{ohif.url}/app-config.js", auth=auth, timeout=10)
    assert "'/dicom-web'" in config.text or '"/dicom-web"' in config.text
    route = requests.get(f"{ohif.url}/viewer?StudyInstanceUIDs=1.2", auth=auth, timeout=10)
    assert route.status_code == 200 and "app-config.js" in route.text  # index.html fallback
    wasm = next(ohif.dist.glob("*.wasm")).name
    answer = requests.get(f"{ohif.url}/{wasm}", auth=auth, timeout=10)
    assert answer.headers["Content-Type"] == "application/wasm"
    # A raw request line, as no browser sends it: nothing outside dist/ is served.
    connection = http.client.HTTPConnection("127.0.0.1", ohif.server_address[1], timeout=10)
    token = requests.auth._basic_auth_str(*auth)
    connection.request("GET", "/../../../../etc/passwd", headers={"Authorization": token})
    escaped = connection.getresponse()
    assert escaped.status == 404 and b"root:" not in escaped.read()
    connection.close()


def secondary_captures(folder: Path) -> list[Path]:
    found = []
    for path in sorted(folder.rglob("*")):
        if not path.is_file():
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (pydicom.errors.InvalidDicomError, OSError):
            continue
        if str(ds.get("SOPClassUID", "")).startswith(SECONDARY_CAPTURE_CLASSES):
            found.append(path)
    return found


@pytest.mark.slow
# 112 s measured (plus 29 s of fixtures) on a 2-core machine at load 11: three scripts, then
# up to 90 s for the viewport to settle. Twice that, rather than the default 300 s.
@pytest.mark.timeout(600)
def test_ohif_shows_the_key_image_generate_sr_wrote(
    ohif: OhifServer,
    dicomweb_orthanc: LocalOrthanc,
    browser: Any,
    corpus_dir: Path,
    weights_cache_dir: Path,
    tmp_path: Path,
) -> None:
    data, output = tmp_path / "data", tmp_path / "output"
    data.mkdir()
    copy_with_new_uids(corpus_dir / "cxr11_siim_cr_jpeg8.dcm", data / "cxr.dcm")
    results = output / "results.json"
    steps = [
        run_script("process_dicom.py", data, "-o", results, "--cache-dir", weights_cache_dir, "-q"),
        run_script("generate_sr.py", "--results", results, "--output-dir", output / "sr", "-q"),
    ]
    assert [s.returncode for s in steps] == [0, 0], [s.stderr for s in steps]
    key_images = secondary_captures(output)
    if not key_images:
        missing_prerequisite(
            "generate_sr.py wrote no Secondary Capture key image (issue 11, part 2, not on "
            "this branch yet)"
        )
    uploaded = run_script("upload_dicom.py", data, output, "-q", env=orthanc_env(dicomweb_orthanc))
    assert uploaded.returncode == 0, uploaded.stderr
    key = pydicom.dcmread(key_images[0])
    shown = viewport_pixels(
        browser,
        dicomweb_orthanc,
        f"{ohif.url}/viewer?StudyInstanceUIDs={key.StudyInstanceUID}"
        f"&initialSeriesInstanceUID={key.SeriesInstanceUID}",
    )
    assert_colours_shown(key.pixel_array, shown)
