"""Every classifier torchxrayvision ships loads as data, exports to ONNX and classifies.

Random weights are saved under each real file name (no download): whole pickled
DenseNets for the DenseNet-121 family, as torchxrayvision publishes them, and a
``state_dict`` of torchvision's ResNet-50 with its one-channel ``conv1`` for
``resnet50-res512-all``, as torchxrayvision loads it. Random weights make logits of
hundreds, so every score would sit at 0 or 1; the classifier layer is scaled down so that
scores land inside (0, 1) and a comparison of them means something.

Each export is compared with torchxrayvision's own model object (its ``forward``: its
own resizing check, sigmoid and operating-point normalisation), not only with our eager
wrapper.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import run_script

from cxrsr.model.classifier import ModelCard, load_classifier, load_torch_model, weights_names
from cxrsr.model.weights import STATE_DICT, WeightsRefused, load_state_dict

DENSENETS = [
    "densenet121-res224-all",
    "densenet121-res224-rsna",
    "densenet121-res224-nih",
    "densenet121-res224-pc",
    "densenet121-res224-chex",
    "densenet121-res224-mimic_nb",
    "densenet121-res224-mimic_ch",
]
RESNET = "resnet50-res512-all"
#: Largest score difference between our ONNX export and torchxrayvision's model.
SCORE_BOUND = 1e-4


def file_name(weights: str) -> str:
    import torchxrayvision as xrv

    return os.path.basename(xrv.models.model_urls[weights]["weights_url"])


def informative_head(model, linear, weights: str, size: int, seed: int) -> None:  # type: ignore[no-untyped-def]
    """Classifier weights that put scores inside (0, 1): logits of about one unit around
    each label's operating threshold, on the test inputs (:func:`rescaled_inputs`)."""
    import torch
    import torchxrayvision as xrv

    seen: list[torch.Tensor] = []
    hook = linear.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    with torch.no_grad():
        model.eval()(torch.from_numpy(rescaled_inputs(size)))
    hook.remove()
    pooled = seen[0]
    generator = torch.Generator().manual_seed(seed)
    direction = torch.randn(linear.weight.shape, generator=generator)
    logits = pooled @ direction.T
    centred = logits - logits.mean(0)
    scale = 1.0 / (centred.abs().max(0).values + 1e-6)
    thresholds = torch.tensor(np.nan_to_num(xrv.models.model_urls[weights]["op_threshs"], nan=0.5))
    with torch.no_grad():
        linear.weight.copy_(direction * scale[:, None])
        linear.bias.copy_(torch.logit(thresholds.float()) - logits.mean(0) * scale)


def save_densenet(folder: Path, weights: str, seed: int) -> None:
    import torch
    import torchxrayvision as xrv

    torch.manual_seed(seed)
    model = xrv.models.DenseNet()
    informative_head(model, model.classifier, weights, 224, seed)
    torch.save(model, folder / file_name(weights))


def save_resnet(folder: Path, seed: int = 7) -> None:
    """What torchxrayvision's ResNet loads: torchvision's ResNet-50 ``state_dict``."""
    import torch
    import torchvision

    torch.manual_seed(seed)
    model = torchvision.models.resnet50(num_classes=18, weights=None)
    model.conv1 = torch.nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    informative_head(model, model.fc, RESNET, 512, seed)
    torch.save(model.state_dict(), folder / file_name(RESNET))


@pytest.fixture(scope="module")
def all_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("all-weights")
    for seed, weights in enumerate(DENSENETS):
        save_densenet(folder, weights, seed)
    save_resnet(folder)
    return folder


def torchxrayvision_model(weights: str, folder: Path):  # type: ignore[no-untyped-def]
    """torchxrayvision's own loading path (``weights_only=False``): only on files made here."""
    import torchxrayvision as xrv

    with contextlib.redirect_stdout(io.StringIO()):
        return xrv.models.get_model(weights, cache_dir=str(folder)).eval()


def test_every_shipped_classifier_is_offered() -> None:
    assert weights_names() == sorted([*DENSENETS, RESNET])


def test_list_weights_prints_labels_size_and_file() -> None:
    out = run_script("process_dicom.py", "--list-weights", timeout=120)
    assert out.returncode == 0, out.stderr
    for weights in [*DENSENETS, RESNET]:
        (line,) = [line for line in out.stdout.splitlines() if line.startswith(weights + " ")]
        size = 512 if weights == RESNET else 224
        assert f"{size}x{size}" in line and file_name(weights) in line
    assert "2 labels: Pneumonia, Lung Opacity" in out.stdout  # the RSNA weights
    assert "ResNet-50" in out.stdout


def rescaled_inputs(size: int) -> np.ndarray:
    """Two plausible inputs: a smooth ramp and noise, in [-1024, 1024]."""
    ramp = np.linspace(-1024, 1024, size * size, dtype=np.float32).reshape(1, size, size)
    noise = np.random.default_rng(3).uniform(-1024, 1024, (1, size, size)).astype(np.float32)
    return np.stack([ramp, noise])


def assert_matches_torchxrayvision(weights: str, folder: Path, size: int) -> ModelCard:
    import torch

    classifier = load_classifier(weights, folder, "cpu", "onnx")
    assert classifier.backend == "onnx"  # the export passed its own check against eager
    assert classifier.input_size == size
    batch = rescaled_inputs(size)
    ours = classifier.predict(batch)
    with torch.inference_mode():
        theirs = torchxrayvision_model(weights, folder)(torch.from_numpy(batch)).numpy()
    outputs = classifier.card.outputs
    for row, reference in zip(ours, theirs, strict=True):
        assert list(row) == classifier.labels
        for label, score in row.items():
            assert abs(score - reference[outputs.index(label)]) <= SCORE_BOUND, (weights, label)
    values = np.array([list(row.values()) for row in ours])
    assert values.min() > 0.001 and values.max() < 0.999  # informative, not saturated
    return classifier.card


#: The default weights and the one with the fewest labels run in the quick loop; the other
#: five (the same network, other labels and thresholds) take 15-20 s each here.
QUICK = {"densenet121-res224-all", "densenet121-res224-rsna"}


@pytest.mark.parametrize(
    "weights",
    [pytest.param(w, marks=() if w in QUICK else pytest.mark.slow) for w in DENSENETS],
)
def test_densenets_export_and_match_torchxrayvision(weights: str, all_weights: Path) -> None:
    card = assert_matches_torchxrayvision(weights, all_weights, 224)
    labels = [label for label in card.outputs if label]
    assert [card.outputs[i] for i in card.kept] == labels


def test_resnet_loads_as_data_exports_and_matches_torchxrayvision(all_weights: Path) -> None:
    assert_matches_torchxrayvision(RESNET, all_weights, 512)
    card = json.loads((all_weights / "cxrsr-onnx" / f"{RESNET}.json").read_text())
    assert card["architecture"] == "ResNet-50" and card["input_size"] == 512


class _Payload:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (self.command,))


def test_a_malicious_resnet_file_cannot_run(tmp_path: Path) -> None:
    import torch

    marker = tmp_path / "payload-ran"
    cache = tmp_path / "cache"
    cache.mkdir()
    # A state_dict whose one "tensor" runs a command when unpickled.
    torch.save({"conv1.weight": _Payload(f"touch {marker}")}, cache / file_name(RESNET))
    with pytest.raises(WeightsRefused, match=r"refused: it names posix\.system"):
        load_torch_model(RESNET, cache)
    assert not marker.exists()
    # A pickled module where a state_dict belongs: its classes are data, but not tensors.
    torch.save({"conv1": torch.nn.Conv2d(1, 1, 1)}, cache / file_name(RESNET))
    with pytest.raises(WeightsRefused, match=r"holds torch\.nn\.modules\.conv\.Conv2d as 'conv1'"):
        load_torch_model(RESNET, cache)
    path = cache / file_name(RESNET)
    torch.save([torch.zeros(1)], path)
    with pytest.raises(WeightsRefused, match="not a state_dict"):
        load_state_dict(path.read_bytes(), path, STATE_DICT)


def test_resnet_classifies_corpus_images_at_512(
    all_weights: Path, corpus_dir: Path, tmp_path: Path
) -> None:
    """Two corpus images through process_dicom.py with the ResNet; then their SR's model."""
    from PIL import Image

    from cxrsr.sr.entries import ModelInfo

    out = tmp_path / "results.json"
    proc = run_script(
        "process_dicom.py",
        corpus_dir / "cxr11_siim_cr_jpeg8.dcm",
        corpus_dir / "cxr05_dx_canon_966_fixed_j2kr.dcm",
        "--weights",
        RESNET,
        "--cache-dir",
        all_weights,
        "--workers",
        "0",
        "-o",
        out,
    )
    assert proc.returncode == 0, proc.stderr
    results = json.loads(out.read_text())
    model = results["model"]
    assert model["weights"] == RESNET and model["architecture"] == "ResNet-50"
    assert model["input_size"] == 512 and "512x512" in model["preprocessing"]
    classified = [e for e in results["images"] if e["status"] == "classified"]
    assert classified
    for entry in classified:
        for relative in entry["heatmaps"].values():
            assert Image.open(out.parent / relative).size == (512, 512)
    info = ModelInfo.from_results(model)
    assert info.algorithm_name == f"torchxrayvision {RESNET}"
    assert model["weights_sha256"] in info.algorithm_version
