"""``--precision int8``: quantized once, cached with its own digest, a distinct algorithm.

Drift is measured on the corpus's production inputs against fp32, as
``docs/performance.md`` defines it: the absolute logit difference as a fraction of each
label's logit spread over the corpus, and findings flipped at the threshold. The weights
are random (no trained weights in the tests), with a classifier layer scaled for scores
inside (0, 1) (:func:`test_models_all.save_densenet`); so the bound tests the mechanism
(calibration, per-channel QDQ, the cache), not the clinical drift of trained weights,
which ``bench/bench_int8.py`` measures on whatever weights it is given.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import run_script
from test_models_all import save_densenet

from cxrsr.classify import prepare
from cxrsr.dicomio.discovery import Source
from cxrsr.errors import PipelineError
from cxrsr.model import int8
from cxrsr.model.classifier import Classifier, load_classifier
from cxrsr.sr import uids
from cxrsr.sr.entries import ModelInfo

WEIGHTS = "densenet121-res224-all"
#: Bounds on the random test weights (see the module docstring): the largest and the
#: 99th percentile logit difference, as a fraction of the label's logit spread. Measured
#: 0.35 and 0.31: random features vary little between images, so calibration on phantoms
#: rather than radiographs costs them much (calibrated on the corpus itself: 0.085). A
#: broken quantization (wrong scales, a layer left out of calibration) exceeds 1.
MAX_DRIFT, P99_DRIFT = 0.5, 0.45


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("int8-weights")
    save_densenet(folder, WEIGHTS, seed=11)
    return folder


@pytest.fixture(scope="module")
def models(cache: Path) -> tuple[Classifier, Classifier]:
    return load_classifier(WEIGHTS, cache, "cpu"), load_classifier(
        WEIGHTS, cache, "cpu", precision="int8"
    )


def corpus_inputs(corpus_dir: Path) -> np.ndarray:
    batch = []
    for path in sorted(corpus_dir.glob("*.dcm")):
        prepared = prepare(Source(str(path)))
        if prepared.model_input is not None:
            batch.append(prepared.model_input)
    assert len(batch) >= 8
    return np.stack(batch)


def drift(fp32: np.ndarray, quantized: np.ndarray) -> tuple[float, float]:
    """Largest and 99th percentile |logit difference| / the label's logit spread."""
    spread = np.ptp(fp32, axis=0)
    fraction = np.abs(quantized - fp32) / spread
    return float(fraction.max()), float(np.percentile(fraction, 99))


def test_int8_drift_is_bounded_on_the_corpus(
    models: tuple[Classifier, Classifier], corpus_dir: Path
) -> None:
    fp32, quantized = models
    assert (fp32.precision, quantized.precision) == ("fp32", "int8")
    inputs = corpus_inputs(corpus_dir)
    a, b = fp32.logits(inputs), quantized.logits(inputs)
    largest, p99 = drift(a[:, fp32.card.kept], b[:, fp32.card.kept])
    assert largest <= MAX_DRIFT and p99 <= P99_DRIFT, (largest, p99)
    assert largest > 0  # it is really another network
    flipped = sum(
        (x[label] >= 0.5) != (y[label] >= 0.5)
        for x, y in zip(fp32.predict(inputs), quantized.predict(inputs), strict=True)
        for label in x
    )
    print(f"int8 drift: max {largest:.3f}, p99 {p99:.3f} of the spread; {flipped} flipped")
    assert flipped <= 0.1 * len(inputs) * len(fp32.labels), flipped


def test_int8_is_cached_beside_the_fp32_export_with_its_own_digest(
    models: tuple[Classifier, Classifier], cache: Path
) -> None:
    _, quantized = models
    card_path, model_path = int8.int8_paths(WEIGHTS, cache)
    card = json.loads(card_path.read_text())
    assert card["int8_onnx_sha256"] == quantized.int8_sha256
    fp32_export = (cache / "cxrsr-onnx" / f"{WEIGHTS}.onnx").read_bytes()
    assert model_path.read_bytes() != fp32_export
    again = load_classifier(WEIGHTS, cache, "cpu", precision="int8")
    assert again.int8_sha256 == quantized.int8_sha256
    # A file changed behind the card's back is not used: it is quantized again.
    original = model_path.read_bytes()
    model_path.write_bytes(original[:-10] + b"\0" * 10)
    assert int8.cached_int8(WEIGHTS, cache, card["fp32_onnx_sha256"]) is None
    load_classifier(WEIGHTS, cache, "cpu", precision="int8")
    assert int8.cached_int8(WEIGHTS, cache, card["fp32_onnx_sha256"]) is not None


def test_int8_is_another_algorithm_in_results_and_sr(
    models: tuple[Classifier, Classifier],
) -> None:
    fp32, quantized = models
    a, b = fp32.describe(), quantized.describe()
    assert a["precision"] == "fp32" and "int8_onnx_sha256" not in a
    assert b["precision"] == "int8" and b["int8_onnx_sha256"] == quantized.int8_sha256
    assert "synthetic" in b["quantization"] and a["weights_sha256"] == b["weights_sha256"]
    info_a, info_b = ModelInfo.from_results(a), ModelInfo.from_results(b)
    assert quantized.int8_sha256 in info_b.algorithm_version
    assert quantized.int8_sha256 not in info_a.algorithm_version
    assert info_a.device_uid != info_b.device_uid
    series = "1.2.826.0.1.3680043.8.498.1"
    assert uids.sr_series_uid(series, info_a.model_id, info_a.weights_sha256) != uids.sr_series_uid(
        series, info_b.model_id, info_b.weights_sha256
    )


def test_calibration_images_are_fixed_and_in_range() -> None:
    first, second = int8.calibration_inputs(64), int8.calibration_inputs(64)
    assert len(first) == int8.CALIBRATION_COUNT
    for x, y in zip(first, second, strict=True):
        assert x.shape == (1, 1, 64, 64) and np.array_equal(x, y)
        assert x.min() >= -1024 and x.max() <= 1024 and np.ptp(x) > 1000


def test_int8_needs_onnx_runtime_on_the_cpu(cache: Path) -> None:
    with pytest.raises(PipelineError, match="runs through ONNX Runtime on the CPU") as error:
        load_classifier(WEIGHTS, cache, "cpu", "eager", precision="int8")
    assert error.value.exit_code == 2


def test_precision_option_end_to_end(
    cache: Path, corpus_dir: Path, tmp_path: Path, models: tuple[Classifier, Classifier]
) -> None:
    """The same image classified in fp32 and int8 makes two SRs of different algorithms."""
    import pydicom
    from conftest import sr_files

    srs = {}
    for precision in ("fp32", "int8"):
        out = tmp_path / precision / "results.json"
        proc = run_script(
            "process_dicom.py",
            corpus_dir / "cxr11_siim_cr_jpeg8.dcm",
            "--precision",
            precision,
            "--no-heatmaps",
            "--workers",
            "0",
            "--cache-dir",
            cache,
            "-o",
            out,
        )
        assert proc.returncode == 0, proc.stderr
        model = json.loads(out.read_text())["model"]
        assert model["precision"] == precision
        sr_dir = tmp_path / precision / "sr"
        proc = run_script(
            "generate_sr.py", "--results", out, "--output-dir", sr_dir, "--no-key-images", "-q"
        )
        assert proc.returncode == 0, proc.stderr
        (path,) = sr_files(sr_dir)
        srs[precision] = (pydicom.dcmread(path), path.read_bytes())
    assert model["int8_onnx_sha256"] == models[1].int8_sha256
    assert model["options"]["precision"] == "int8"
    (fp32, fp32_bytes), (int8_sr, int8_bytes) = srs["fp32"], srs["int8"]
    assert fp32.SeriesInstanceUID != int8_sr.SeriesInstanceUID
    assert fp32.SOPInstanceUID != int8_sr.SOPInstanceUID
    assert f"{WEIGHTS} int8".encode() in int8_bytes and b" int8" not in fp32_bytes
    assert models[1].int8_sha256.encode() in int8_bytes
