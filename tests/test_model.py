"""The model wrapper: torchxrayvision's loading path, score definition, ONNX against eager."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cxrsr.classify import PreparedImage, classified_entry
from cxrsr.config import PROJECT_ROOT
from cxrsr.model.classifier import (
    Classifier,
    ModelCard,
    default_cache_dir,
    load_classifier,
    scores_from_logits,
)
from cxrsr.model.heatmaps import heatmap_labels
from cxrsr.results import rounded_score


def test_scores_follow_torchxrayvision_op_norm() -> None:
    import torch
    import torchxrayvision as xrv

    thresholds = list(xrv.models.model_urls["densenet121-res224-all"]["op_threshs"])
    thresholds[3] = float("nan")  # a label without a threshold stays at 0.5, as in xrv
    logits = np.random.default_rng(1).normal(0, 4, size=(64, 18)).astype(np.float32)
    expected = xrv.models.op_norm(torch.sigmoid(torch.from_numpy(logits)), torch.tensor(thresholds))
    ours = scores_from_logits(logits, thresholds)
    np.testing.assert_allclose(ours, expected.numpy(), atol=1e-6)
    assert np.all(ours[:, 3] == 0.5)


def test_default_cache_dir_is_torchxrayvisions() -> None:
    import torchxrayvision as xrv

    assert default_cache_dir() == Path(xrv.utils.get_cache_dir())


def test_onnx_backend_matches_eager_on_real_images(
    weights_cache_dir: Path, corpus_dir: Path
) -> None:
    from cxrsr.dicomio.discovery import Source
    from cxrsr.dicomio.reading import read_radiograph
    from cxrsr.model.preprocess import preprocess

    names = [
        "cxr04_nema_RG1_JLSN.dcm",
        "cxr05_dx_canon_966_fixed_j2kr.dcm",
        "cxr11_siim_cr_jpeg8.dcm",
    ]
    batch = np.stack(
        [preprocess(read_radiograph(Source(str(corpus_dir / n))).pixels) for n in names]
    )
    onnx = load_classifier(cache_dir=weights_cache_dir, backend="onnx")
    eager = load_classifier(cache_dir=weights_cache_dir, backend="eager")
    assert (onnx.backend, eager.backend) == ("onnx", "eager")
    a, b = onnx.logits(batch), eager.logits(batch)
    assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max()
    for x, y in zip(onnx.predict(batch), eager.predict(batch), strict=True):
        assert max(abs(x[k] - y[k]) for k in x) <= 1e-4
    assert onnx.card.weights_sha256 == eager.card.weights_sha256


def test_cached_export_starts_without_importing_torch(weights_cache_dir: Path) -> None:
    load_classifier(cache_dir=weights_cache_dir, backend="onnx")  # make sure the export exists
    code = (
        "import sys; from cxrsr.model.classifier import load_classifier; "
        f"c = load_classifier(cache_dir={str(weights_cache_dir)!r}, device='cpu'); "
        "print(c.backend, 'torch' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["onnx", "False"]


def test_replaced_weights_file_invalidates_the_export(
    weights_cache_dir: Path, tmp_path: Path
) -> None:
    import shutil

    import torch
    import torchxrayvision as xrv

    cache = tmp_path / "cache"
    shutil.copytree(weights_cache_dir, cache, ignore=shutil.ignore_patterns("cxrsr-onnx"))
    first = load_classifier(cache_dir=cache, backend="onnx")
    torch.manual_seed(1)
    torch.save(xrv.models.DenseNet(), first.card.weights_file)
    second = load_classifier(cache_dir=cache, backend="onnx")
    assert second.card.weights_sha256 != first.card.weights_sha256
    x = np.zeros((1, 1, 224, 224), np.float32)
    eager = load_classifier(cache_dir=cache, backend="eager")
    np.testing.assert_allclose(second.logits(x), eager.logits(x), rtol=1e-4, atol=1e-3)


# --- decisions on the model's numbers, not on rounded ones ---------------------------------

#: Scores at the threshold (0.5): just below, just above, exactly at it.
BOUNDARY = {"Below": 0.4999996, "Above": 0.5000004, "At": 0.5}


def _boundary_classifier() -> Classifier:
    """A classifier whose network returns logits whose float32 scores sit at the threshold.

    With an operating threshold of 0.5, op_norm leaves the sigmoid as it is, so the logits
    -1.6e-6, 1.6e-6 and 0 give 0.4999996, 0.5000004 and 0.5 in float32.
    """
    logits = np.array([[-1.6e-6, 1.6e-6, 0.0]], dtype=np.float32)
    cams = np.zeros((1, 3, 7, 7), dtype=np.float32)
    card = ModelCard(
        weights="boundary",
        weights_file=Path("boundary.pt"),
        weights_sha256="0" * 64,
        outputs=list(BOUNDARY),
        op_threshs=[0.5, 0.5, 0.5],
        torchxrayvision_version="1.5.7",
    )
    return Classifier(card, "cpu", "crafted", lambda batch: (logits, cams))


def test_scores_reach_the_caller_unrounded() -> None:
    (scores,) = _boundary_classifier().predict(np.zeros((1, 1, 224, 224), np.float32))
    assert scores["Below"] < 0.5 < scores["Above"] and scores["At"] == 0.5
    assert round(scores["Below"], 6) == 0.5  # what rounding first used to decide
    assert heatmap_labels(scores) == ["Above", "At"]  # heatmaps follow the real findings


def _entry(scores: dict[str, float]) -> dict[str, Any]:
    identity = {
        key: "1.2.3"
        for key in (
            "sop_instance_uid",
            "series_instance_uid",
            "study_instance_uid",
            "sop_class_uid",
        )
    }
    identity.update(
        patient_id="P",
        modality="CR",
        body_part_examined="CHEST",
        photometric_interpretation="MONOCHROME2",
        rows=1,
        columns=1,
        transfer_syntax_uid="1.2.840.10008.1.2.1",
    )
    return classified_entry(PreparedImage("x.dcm", "ready", identity=identity), scores, 0.5)


@pytest.mark.parametrize("source", ["crafted logits", "python floats"])
def test_findings_are_decided_on_unrounded_scores(source: str) -> None:
    if source == "crafted logits":
        (scores,) = _boundary_classifier().predict(np.zeros((1, 1, 224, 224), np.float32))
    else:
        scores = dict(BOUNDARY)
    entry = _entry(scores)
    assert entry["findings"] == ["Above", "At"]
    assert entry["scores"] == {"Below": 0.499999, "Above": 0.5, "At": 0.5}
    # The stored scores tell the same story as the findings, to anyone who compares again.
    assert [label for label, s in entry["scores"].items() if s >= 0.5] == entry["findings"]


@pytest.mark.parametrize(
    ("score", "threshold", "decimals", "stored"),
    [
        (0.4999996, 0.5, 6, 0.499999),  # rounding would reach the threshold: stays below
        (float(np.float32(0.4999996)), 0.5, 6, 0.499999),
        (0.4999994, 0.5, 6, 0.499999),  # ordinary rounding
        (0.5000004, 0.5, 6, 0.5),
        (0.5, 0.5, 6, 0.5),
        (0.12345678, 0.5, 6, 0.123457),
        (0.33333331, 0.3333333, 6, 0.333334),  # at or above: never rounded down below it
        (0.33333329, 0.3333333, 6, 0.333333),
        (0.499, 0.5, 2, 0.49),  # as the key image shows it (two decimals)
        (0.4996, 0.5, 3, 0.499),  # as the report shows it (three decimals)
        (0.501, 0.5, 2, 0.5),
    ],
)
def test_rounding_never_crosses_the_threshold(
    score: float, threshold: float, decimals: int, stored: float
) -> None:
    rounded = rounded_score(score, threshold, decimals)
    assert rounded == stored
    assert (rounded >= threshold) == (score >= threshold)
