"""The model wrapper: torchxrayvision's loading path, score definition, ONNX against eager."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from cxrsr.config import PROJECT_ROOT
from cxrsr.model.classifier import default_cache_dir, load_classifier, scores_from_logits


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
