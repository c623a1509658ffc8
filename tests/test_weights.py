"""A weights file is data, not code (issue 9, item 5).

The published torchxrayvision weights are whole pickled DenseNet modules written by
PyTorch before 1.6 (legacy format, no ``_non_persistent_buffers_set``); the tests' random
weights are the same module written by today's ``torch.save`` (zip format). Both must load,
to the very tensors torchxrayvision's own loader gives; anything else is refused with
exit 3 and one line, before it can run.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import WEIGHTS_NAME, run_script

from cxrsr.errors import PipelineError
from cxrsr.model.classifier import load_classifier, load_torch_model, sha256_of
from cxrsr.model.weights import WeightsRefused, load_state_dict


def weights_file_name() -> str:
    import torchxrayvision as xrv

    return os.path.basename(xrv.models.model_urls[WEIGHTS_NAME]["weights_url"])


class _Payload:
    """A pickle that runs a shell command when loaded by ``pickle``/``torch.load``."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (self.command,))


class _SecondStage:
    """A pickle that *calls* DenseNet(weights=..., cache_dir=elsewhere) when loaded.

    Allow-listing DenseNet for PyTorch's weights-only unpickler permits this call, and
    torchxrayvision then ``torch.load(weights_only=False)``s the file in ``cache_dir``.
    """

    def __init__(self, cache_dir: str) -> None:
        self.cache_dir = cache_dir

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        import torchxrayvision as xrv

        return (
            xrv.models.DenseNet,
            (32, (6, 12, 24, 16), 64, 4, 0, 18, 1, WEIGHTS_NAME, self.cache_dir),
        )


def save_legacy_densenet(path: Path, seed: int = 2) -> None:
    """A DenseNet pickled as torchxrayvision's published files are: legacy format, old modules."""
    import torch
    import torchxrayvision as xrv

    torch.manual_seed(seed)
    model = xrv.models.DenseNet()
    for module in model.modules():
        # PyTorch < 1.6 had no such attribute; torchxrayvision patches it back on load.
        del module._non_persistent_buffers_set
    torch.save(model, path, _use_new_zipfile_serialization=False)


@pytest.fixture
def legacy_cache(tmp_path: Path) -> Path:
    cache = tmp_path / "legacy"
    cache.mkdir()
    save_legacy_densenet(cache / weights_file_name())
    return cache


def torchxrayvision_own_model(cache_dir: Path):  # type: ignore[no-untyped-def]
    """torchxrayvision's loading path (weights_only=False): only for files the test made."""
    import contextlib
    import io

    import torchxrayvision as xrv

    with contextlib.redirect_stdout(io.StringIO()):
        return xrv.models.DenseNet(weights=WEIGHTS_NAME, cache_dir=str(cache_dir)).eval()


@pytest.mark.parametrize("kind", ["zip (tests' random weights)", "legacy (published files)"])
def test_loads_what_torchxrayvision_loads(
    kind: str, weights_cache_dir: Path, legacy_cache: Path
) -> None:
    import torch

    cache = weights_cache_dir if kind.startswith("zip") else legacy_cache
    ours, card = load_torch_model(WEIGHTS_NAME, cache)
    theirs = torchxrayvision_own_model(cache)
    a, b = ours.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert ours.pathologies == theirs.pathologies
    assert torch.equal(ours.op_threshs, theirs.op_threshs)
    assert ours.input_resolution == theirs.input_resolution
    x = torch.linspace(-1024, 1024, 2 * 224 * 224).reshape(2, 1, 224, 224)
    with torch.inference_mode():
        assert torch.equal(ours(x), theirs(x))
    assert card.weights_sha256 == sha256_of(cache / weights_file_name())


def test_code_in_a_weights_file_does_not_run(tmp_path: Path, corpus_dir: Path) -> None:
    import torch

    marker = tmp_path / "payload-ran"
    cache = tmp_path / "cache"
    cache.mkdir()
    torch.save(_Payload(f"touch {marker}"), cache / weights_file_name())
    out = run_script(
        "process_dicom.py",
        corpus_dir / "cxr11_siim_cr_jpeg8.dcm",
        "--cache-dir",
        cache,
        "--workers",
        "0",
        "-o",
        tmp_path / "results.json",
    )
    assert not marker.exists()
    assert out.returncode == 3, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("E: weights file "), out.stderr
    assert "refused" in lines[0] and "posix.system" in lines[0]


@pytest.mark.parametrize("legacy", [False, True])
def test_payloads_are_refused_in_either_format(tmp_path: Path, legacy: bool) -> None:
    import torch

    marker = tmp_path / "payload-ran"
    path = tmp_path / "payload.pt"
    torch.save(_Payload(f"touch {marker}"), path, _use_new_zipfile_serialization=not legacy)
    with pytest.raises(WeightsRefused, match=r"refused: it names posix\.system"):
        load_state_dict(path.read_bytes(), path)
    assert not marker.exists()


def test_a_pickle_cannot_call_densenet_to_load_another_file(tmp_path: Path) -> None:
    import torch

    marker = tmp_path / "payload-ran"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    torch.save(_Payload(f"touch {marker}"), elsewhere / weights_file_name())
    cache = tmp_path / "cache"
    cache.mkdir()
    torch.save(_SecondStage(str(elsewhere)), cache / weights_file_name())
    with pytest.raises(WeightsRefused, match=r"calls torchxrayvision\.models\.DenseNet"):
        load_torch_model(WEIGHTS_NAME, cache)
    assert not marker.exists()


def test_other_objects_and_foreign_layers_are_refused(tmp_path: Path) -> None:
    import torch

    path = tmp_path / "w.pt"
    torch.save({"state_dict": {}}, path)  # a plain dict: data, but not a DenseNet
    with pytest.raises(WeightsRefused, match="not a torchxrayvision DenseNet"):
        load_state_dict(path.read_bytes(), path)
    torch.save(torch.nn.Sequential(torch.nn.GELU()), path)
    with pytest.raises(WeightsRefused, match=r"names torch\.nn\.modules\.activation\.GELU"):
        load_state_dict(path.read_bytes(), path)


def test_weights_sha256_is_checked_before_unpickling(
    tmp_path: Path, weights_cache_dir: Path
) -> None:
    import torch

    marker = tmp_path / "payload-ran"
    cache = tmp_path / "cache"
    cache.mkdir()
    torch.save(_Payload(f"touch {marker}"), cache / weights_file_name())
    good = sha256_of(weights_cache_dir / weights_file_name())
    with pytest.raises(PipelineError, match=f"does not match --weights-sha256 {good}") as info:
        load_classifier(cache_dir=cache, backend="eager", weights_sha256=good)
    assert info.value.exit_code == 3
    assert not marker.exists()
    classifier = load_classifier(cache_dir=weights_cache_dir, backend="eager", weights_sha256=good)
    assert classifier.card.weights_sha256 == good


def test_weights_sha256_option(tmp_path: Path, weights_cache_dir: Path, corpus_dir: Path) -> None:
    wrong = "0" * 64
    out = run_script(
        "process_dicom.py",
        corpus_dir / "cxr11_siim_cr_jpeg8.dcm",
        "--cache-dir",
        weights_cache_dir,
        "--weights-sha256",
        wrong,
        "-o",
        tmp_path / "results.json",
    )
    assert out.returncode == 3, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and f"does not match --weights-sha256 {wrong}" in lines[0]
    usage = run_script("process_dicom.py", "--weights-sha256", "abc")
    assert usage.returncode == 2 and "64 hexadecimal digits" in usage.stderr


def _copy_without_export(source: Path, target: Path) -> Path:
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("cxrsr-onnx"))
    return target


def test_a_tampered_onnx_export_is_not_used(tmp_path: Path, weights_cache_dir: Path) -> None:
    """An export swapped for another model's (its card unchanged) is made again, not used."""
    cache = _copy_without_export(weights_cache_dir, tmp_path / "cache")
    first = load_classifier(cache_dir=cache, backend="onnx")
    other = _copy_without_export(weights_cache_dir, tmp_path / "other")
    save_legacy_densenet(other / weights_file_name(), seed=5)
    load_classifier(cache_dir=other, backend="onnx")
    onnx = cache / "cxrsr-onnx" / f"{WEIGHTS_NAME}.onnx"
    shutil.copyfile(other / "cxrsr-onnx" / f"{WEIGHTS_NAME}.onnx", onnx)
    x = np.linspace(-1024, 1024, 224 * 224, dtype=np.float32).reshape(1, 1, 224, 224)
    again = load_classifier(cache_dir=cache, backend="onnx")
    np.testing.assert_allclose(again.logits(x), first.logits(x), rtol=1e-5)
    assert sha256_of(onnx) != sha256_of(other / "cxrsr-onnx" / f"{WEIGHTS_NAME}.onnx")


def test_a_valid_export_of_other_weights_is_not_used(
    tmp_path: Path, weights_cache_dir: Path
) -> None:
    """With --weights-sha256, a consistent cache of other weights is refused, not used."""
    wanted = sha256_of(weights_cache_dir / weights_file_name())
    other = _copy_without_export(weights_cache_dir, tmp_path / "other")
    save_legacy_densenet(other / weights_file_name(), seed=5)
    assert load_classifier(cache_dir=other, backend="onnx").backend == "onnx"
    with pytest.raises(PipelineError, match="does not match --weights-sha256") as info:
        load_classifier(cache_dir=other, backend="onnx", weights_sha256=wanted)
    assert info.value.exit_code == 3


def test_a_truncated_download_is_refused_with_advice(
    tmp_path: Path, weights_cache_dir: Path
) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    whole = (weights_cache_dir / weights_file_name()).read_bytes()
    (cache / weights_file_name()).write_bytes(whole[: len(whole) // 2])
    with pytest.raises(WeightsRefused, match="delete it and rerun to download it again") as info:
        load_torch_model(WEIGHTS_NAME, cache)
    assert info.value.exit_code == 3 and "\n" not in str(info.value)
