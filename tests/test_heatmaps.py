"""Heatmaps and previews beside the results file, checked against independent computations.

Random weights give meaningless maps, so these tests check what can be known: each stored
heatmap is torchxrayvision's own model's class activation map for that label (a forward
hook on ``model.features``), in the input geometry the model saw; each preview is the
file windowed as its header says.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from conftest import WEIGHTS_NAME, process_files
from PIL import Image

from cxrsr.classify import REDUCED_DECODE_MIN_SIZE
from cxrsr.dicomio.discovery import Source
from cxrsr.dicomio.preview import PREVIEW_LONG_SIDE, Display, make_preview, preview_size
from cxrsr.dicomio.reading import read_radiograph, read_radiograph_bytes
from cxrsr.model.preprocess import reference_preprocess

#: Classifiable corpus files covering MONOCHROME1 and 2, non-square images, reduced
#: decoding (JPEG baseline, JPEG 2000) and JPEG-LS.
NAMES = [
    "cxr04_nema_RG1_JLSN.dcm",
    "cxr05_dx_canon_966_fixed_j2kr.dcm",
    "cxr09_orthanc_issue44_mono1_jpeg8.dcm",
    "cxr11_siim_cr_jpeg8.dcm",
    "edge_vet_dog_dx_thorax_small.dcm",
]


@pytest.fixture(scope="module")
def processed(
    corpus_dir: Path, weights_cache_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict[str, dict[str, Any]]]:
    out = tmp_path_factory.mktemp("heatmaps") / "results.json"
    process_files(out, weights_cache_dir, *(corpus_dir / name for name in NAMES), "--workers", "1")
    document = json.loads(out.read_text())
    return out.parent, {Path(e["path"]).name: e for e in document["images"]}


@pytest.fixture(scope="module")
def xrv_model(weights_cache_dir: Path) -> Any:
    import torchxrayvision as xrv

    return xrv.models.DenseNet(weights=WEIGHTS_NAME, cache_dir=str(weights_cache_dir)).eval()


def torchxrayvision_cams(model: Any, model_input: np.ndarray) -> dict[str, np.ndarray]:
    """8-bit 224x224 CAM per label, computed from torchxrayvision's model with a forward hook."""
    import torch
    import torch.nn.functional as F

    captured: list[torch.Tensor] = []
    hook = model.features.register_forward_hook(lambda m, i, o: captured.append(o.clone()))
    try:
        with torch.no_grad():
            model(torch.from_numpy(model_input[None].astype(np.float32)))
    finally:
        hook.remove()
    features = torch.relu(captured[0][0]).double()  # features2: relu, then pool
    weights = model.classifier.weight.detach().double()
    maps = {}
    for k, label in enumerate(model.pathologies):
        if not label:
            continue
        cam = torch.einsum("c,chw->hw", weights[k], features)
        up = F.interpolate(cam[None, None], size=(224, 224), mode="bilinear", align_corners=False)
        up = up[0, 0].numpy()
        maps[label] = np.rint((up - up.min()) / (up.max() - up.min()) * 255)
    return maps


def load_png(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.format == "PNG" and image.mode == "L"
        return np.asarray(image)


def test_heatmaps_are_the_models_class_activation_maps(
    processed, corpus_dir: Path, xrv_model: Any
) -> None:
    """Each stored heatmap equals torchxrayvision's CAM for its label on the input the model saw.

    The reference input is torchxrayvision's own preprocessing (``XRayCenterCrop`` and
    ``XRayResizer`` on a full decode), independent of the fast path's reduced decoding;
    a map flipped, transposed, cropped elsewhere or of another label would not match.
    """
    folder, entries = processed
    for name in NAMES:
        entry = entries[name]
        assert entry["status"] == "classified"
        found = [label for label, score in entry["scores"].items() if score >= 0.5]
        top = max(entry["scores"], key=lambda label: entry["scores"][label])
        assert list(entry["heatmaps"]) == (found or [top])
        pixels = read_radiograph(Source(str(corpus_dir / name))).pixels
        expected = torchxrayvision_cams(xrv_model, reference_preprocess(pixels))
        for label, relative in entry["heatmaps"].items():
            assert not Path(relative).is_absolute()
            stored = load_png(folder / relative).astype(float)
            assert stored.shape == (224, 224)
            assert stored.max() == 255 and stored.min() == 0
            mine = expected[label]
            error = np.abs(stored - mine).mean()
            assert error < 4, (name, label, error)
            # A wrong geometry or label does much worse than the small input difference.
            for wrong in (mine.T, mine[::-1], mine[:, ::-1]):
                assert np.abs(stored - wrong).mean() > error + 4, (name, label)
            others = [m for other, m in expected.items() if other != label]
            assert min(np.abs(stored - m).mean() for m in others) > error, (name, label)


def test_heatmaps_match_exactly_on_the_pipelines_own_input(
    processed, corpus_dir: Path, xrv_model: Any
) -> None:
    """On the very input the pipeline computed, the ONNX maps equal torchxrayvision's to 1 level."""
    from cxrsr.classify import prepare

    folder, entries = processed
    for name in NAMES:
        item = prepare(Source(str(corpus_dir / name)))
        assert item.model_input is not None
        expected = torchxrayvision_cams(xrv_model, item.model_input)
        for label, relative in entries[name]["heatmaps"].items():
            difference = np.abs(load_png(folder / relative).astype(float) - expected[label])
            assert difference.max() <= 1, (name, label)


def independent_display(path: Path) -> np.ndarray:
    """The file as a viewer shows it, in [0, 1]: Modality LUT, VOI window, MONOCHROME1 inverted."""
    ds = pydicom.dcmread(path)
    values = ds.pixel_array.astype(np.float64) * float(ds.get("RescaleSlope", 1)) + float(
        ds.get("RescaleIntercept", 0)
    )
    if "WindowCenter" in ds:
        center = float(np.atleast_1d(ds.WindowCenter)[0])
        width = float(np.atleast_1d(ds.WindowWidth)[0])
        # PS3.3 C.11.2.1.2.1, LINEAR
        grey = np.clip((values - (center - 0.5)) / (width - 1) + 0.5, 0, 1)
    else:
        grey = (values - values.min()) / (values.max() - values.min())
    inverse = ds.PhotometricInterpretation == "MONOCHROME1" or (
        ds.get("PresentationLUTShape") == "INVERSE"
    )
    return 1 - grey if inverse else grey


def resized(grey: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    image = Image.fromarray(grey.astype(np.float32), mode="F")
    return np.asarray(image.resize((size[1], size[0]), Image.Resampling.BOX)) * 255


def test_previews_are_the_files_windowed_as_a_viewer_shows_them(
    processed, corpus_dir: Path
) -> None:
    """Compared at half the preview's size: a preview has the detail the model's reader
    decoded (at least 448 pixels on the short side), never enlarged, at most 1024."""
    folder, entries = processed
    sizes = set()
    for name in NAMES:
        entry = entries[name]
        preview = load_png(folder / entry["preview"]).astype(float)
        expected = independent_display(corpus_dir / name)
        decoded = read_radiograph(
            Source(str(corpus_dir / name)), min_size=REDUCED_DECODE_MIN_SIZE
        ).pixels.shape
        # The decoded detail, never enlarged, at most PREVIEW_LONG_SIDE; the file's aspect.
        assert max(preview.shape) == min(max(decoded), PREVIEW_LONG_SIDE), (name, decoded)
        assert preview.shape == preview_size(expected.shape, decoded)
        aspect = (preview.shape[0] / preview.shape[1]) / (expected.shape[0] / expected.shape[1])
        assert abs(aspect - 1) < 0.01, (name, preview.shape, expected.shape)
        sizes.add("reduced" if max(decoded) < max(expected.shape) else "full")
        sizes.add("shrunk" if max(decoded) > PREVIEW_LONG_SIDE else "as decoded")
        half = (preview.shape[0] // 2, preview.shape[1] // 2)
        preview = resized(preview / 255, half)
        error = np.abs(preview - resized(expected, half)).mean()
        # Without a window, min-max of a reduced decode (cxr11) is a little narrower than
        # the full image's: its extremes are averaged with their neighbours.
        windowed = "WindowCenter" in pydicom.dcmread(corpus_dir / name, stop_before_pixels=True)
        assert error < (3 if windowed else 8), (name, error)
        assert np.abs(preview - resized(1 - expected, half)).mean() > 30
    # The corpus files cover a reduced decode, a full one, and one larger than 1024.
    assert sizes == {"reduced", "full", "shrunk", "as decoded"}, sizes


def test_preview_crop_is_the_square_the_model_saw(processed, corpus_dir: Path) -> None:
    """The preview cut at ``preview_crop`` looks like the model's input (same crop, orientation)."""
    folder, entries = processed
    for name in NAMES:
        entry = entries[name]
        x, y, width, height = entry["preview_crop"]
        assert abs(width - height) < 1
        with Image.open(folder / entry["preview"]) as image:
            crop = image.resize((224, 224), Image.Resampling.BOX, box=(x, y, x + width, y + height))
        pixels = read_radiograph(Source(str(corpus_dir / name))).pixels
        model_input = reference_preprocess(pixels)[0]
        correlation = np.corrcoef(np.asarray(crop, dtype=float).ravel(), model_input.ravel())[0, 1]
        # MONOCHROME1 files are inverted for both; a VOI window is monotonic.
        assert correlation > 0.9, (name, correlation)


@pytest.mark.parametrize(
    "display",
    [
        Display(0, 4095, False),
        Display(0, 4095, True),
        Display(-1000, 3000, False, (1500.0, 2000.0, "LINEAR")),
        Display(-1000, 3000, True, (1500.0, 2000.0, "LINEAR")),
        Display(0, 255, False, (100.0, 50.0, "LINEAR_EXACT")),
        Display(0, 255, True, (60.0, 81.0, "LINEAR_EXACT")),
        Display(0, 4095, False, (2000.0, 1.0, "LINEAR")),  # a hard threshold
        Display(0, 4095, True, (2000.0, 500.0, "SIGMOID")),
    ],
)
def test_the_fast_linear_display_is_the_general_one(display: Display) -> None:
    """display_bytes folds a linear display into one multiply-add: the same grey levels as
    display_grey's step-by-step arithmetic, give or take float32 rounding at a half."""
    from cxrsr.dicomio.preview import display_bytes, display_grey

    rng = np.random.default_rng(7)
    pixels = (rng.random((300, 200)) * 2048 - 1024).astype(np.float32)
    expected = np.rint(np.clip(display_grey(pixels, display), 0, 1) * 255)
    difference = np.abs(display_bytes(pixels, display).astype(float) - expected)
    assert difference.max() <= 1 and (difference > 0).mean() < 1e-3
    assert len(np.unique(expected)) >= 2  # the case tests grey levels, not a blank


def test_preview_applies_the_voi_window_and_lut(corpus_dir: Path) -> None:
    """A narrow window saturates; a VOI LUT Sequence is followed; both as PS3.3 C.11.2 says."""
    original = pydicom.dcmread(corpus_dir / "cxr10_nih_dx_8bit.dcm")  # 8-bit, no VOI
    stored = original.pixel_array.astype(np.float64)

    def preview_of(ds: pydicom.Dataset) -> np.ndarray:
        from io import BytesIO

        buffer = BytesIO()
        ds.save_as(buffer)
        radiograph = read_radiograph_bytes(buffer.getvalue())
        assert radiograph.display is not None
        shape = stored.shape
        return make_preview(radiograph.pixels, radiograph.display, shape).astype(float)

    windowed = copy.deepcopy(original)
    windowed.WindowCenter, windowed.WindowWidth = "60", "81"
    expected = np.clip((stored - 59.5) / 80 + 0.5, 0, 1)
    assert np.abs(preview_of(windowed) - expected * 255).mean() < 1
    assert np.abs(preview_of(original) - expected * 255).mean() > 20  # the window matters

    lut = pydicom.Dataset()
    lut.LUTDescriptor = [256, 0, 16]
    table = (np.linspace(0, 1, 256) ** 2 * 4095).astype(np.uint16)
    lut.LUTData = table.tolist()
    lut["LUTData"].VR = "US"
    with_lut = copy.deepcopy(windowed)
    with_lut.VOILUTSequence = pydicom.Sequence([lut])
    expected = table[stored.astype(int)] / 4095
    assert np.abs(preview_of(with_lut) - expected * 255).mean() < 1


def test_no_heatmaps_writes_none(corpus_dir: Path, weights_cache_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    process_files(out, weights_cache_dir, corpus_dir / NAMES[3], "--no-heatmaps")
    entry = json.loads(out.read_text())["images"][0]
    assert "heatmaps" not in entry and "preview" not in entry
    assert sorted(os.listdir(tmp_path)) == ["results.json"]


def test_a_folder_that_cannot_take_heatmaps_ends_the_run_with_exit_3(
    corpus_dir: Path, weights_cache_dir: Path, tmp_path: Path
) -> None:
    """One line naming the folder and the reason, no traceback, and no journaled entry that
    names a heatmap which was never written."""
    from conftest import run_script

    from cxrsr.journal import journal_path

    out = tmp_path / "results.json"
    (tmp_path / "heatmaps").write_text("a file where the heatmaps folder should be")
    proc = run_script(
        "process_dicom.py", corpus_dir / NAMES[3], "-o", out, "--cache-dir", weights_cache_dir
    )
    assert proc.returncode == 3, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("E:")]
    assert len(errors) == 1 and f"{tmp_path}: cannot write heatmaps" in errors[0], proc.stderr
    journal = journal_path(out)
    assert not journal.exists() or '"entry"' not in journal.read_text()


def test_an_onnx_export_without_maps_is_made_again(weights_cache_dir: Path, tmp_path: Path) -> None:
    """A cache from before heatmaps (no ``export_version``) is exported again, with the maps."""
    from cxrsr.model.classifier import load_classifier

    cache = tmp_path / "cache"
    cache.mkdir()
    for file in weights_cache_dir.glob("*.pt"):
        os.symlink(file, cache / file.name)
    load_classifier(WEIGHTS_NAME, cache, "cpu", "onnx")
    card_path = cache / "cxrsr-onnx" / f"{WEIGHTS_NAME}.json"
    card = json.loads(card_path.read_text())
    del card["export_version"]
    card_path.write_text(json.dumps(card))
    onnx_path = card_path.with_suffix(".onnx")
    onnx_path.write_bytes(b"an old export")
    classifier = load_classifier(WEIGHTS_NAME, cache, "cpu", "onnx")
    assert classifier.backend == "onnx"
    assert onnx_path.read_bytes() != b"an old export"
    scores, maps = classifier.predict_with_maps(np.zeros((1, 1, 224, 224), np.float32))
    assert set(maps[0]) == set(scores[0]) and maps[0]["Effusion"].shape == (7, 7)


@pytest.fixture(params=["isal", "zlib"])
def deflate(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each of the PNG deflate back ends: ISA-L (installed by requirements.txt) and the
    standard library's zlib, which platforms without an ISA-L wheel use."""
    from cxrsr.dicomio import preview

    if request.param == "zlib":
        monkeypatch.setattr(preview, "_compress", preview._zlib_compress)
        monkeypatch.setattr(preview, "_decompress", preview._zlib_decompress)
    else:
        assert preview._compress.__name__ == "_isal_compress", "isal is not installed"
    return str(request.param)


def test_png_bytes_round_trips_through_pillow(deflate: str) -> None:
    """Our PNG encoder (Up filter, ISA-L or zlib) gives what Pillow reads back exactly."""
    from io import BytesIO

    from cxrsr.dicomio.preview import png_bytes

    rng = np.random.default_rng(0)
    for shape in [(1, 1), (3, 5), (224, 224), (1024, 817)]:
        array = rng.integers(0, 256, shape).astype(np.uint8)
        with Image.open(BytesIO(png_bytes(array))) as image:
            assert image.format == "PNG" and image.mode == "L"
            assert np.array_equal(np.asarray(image), array)


@pytest.mark.parametrize("shape", [(1, 1), (7, 5), (224, 224), (1024, 833)])
def test_read_png_reads_what_png_bytes_writes_as_pillow_does(
    shape: tuple[int, int], deflate: str
) -> None:
    """generate_sr.py reads the previews and heatmaps with preview.read_png (zlib and
    numpy, no GIL ping-pong); it must give exactly what Pillow decodes."""
    import io

    from PIL import Image

    from cxrsr.dicomio.preview import png_bytes, read_png

    rng = np.random.default_rng(shape[0])
    image = rng.integers(0, 256, shape, dtype=np.uint8)
    image[: shape[0] // 2] //= 7  # smooth and noisy rows both
    data = png_bytes(image)
    assert np.array_equal(read_png(data), image)
    assert np.array_equal(read_png(data), np.asarray(Image.open(io.BytesIO(data))))
    # Any other PNG goes to Pillow: its own encoder's filters, and colour.
    for mode in ("L", "RGB"):
        buffer = io.BytesIO()
        Image.fromarray(image).convert(mode).save(buffer, "PNG")
        assert np.array_equal(read_png(buffer.getvalue()), image)
