"""Load a torchxrayvision classifier and run it in batches, through ONNX Runtime or PyTorch.

Every classifier torchxrayvision ships is supported (:func:`weights_names`): the
DenseNet-121 family at 224x224 and ResNet-50 at 512x512. The input size is the model's
own (``input_resolution`` in torchxrayvision's table, kept on the :class:`ModelCard`):
preprocessing, reduced-resolution decoding and heatmaps follow it.

Weights are downloaded once by torchxrayvision's own downloader, from its GitHub release
or ``CXRSR_WEIGHTS_BASE_URL`` (:func:`cxrsr.model.weights.weights_url`; when that fails,
offline machines, firewalls, the error says which file to put where), then read as data
by :mod:`cxrsr.model.weights`, never by torchxrayvision's ``torch.load(weights_only=False)``.

Backends, all fp32 (the model's own precision):

- ``onnx`` (default on the CPU): the network up to its logits, exported once per weights
  file to ONNX and run by ONNX Runtime, about 3x faster than eager PyTorch here. The
  export is checked against the eager model when it is made, and kept beside the weights
  (``cxrsr-onnx/``) with the labels and thresholds, so later runs need not import
  PyTorch at all: that saves seconds of start-up on every run.
- ``eager``: PyTorch in channels-last memory format (the default on CUDA).

Scores follow torchxrayvision's definition, ``op_norm(sigmoid(logits))`` for weights with
operating thresholds (0.5 = each label's threshold). :func:`scores_from_logits` computes
it in NumPy; ``tests/test_model.py`` checks it against ``xrv.models.op_norm``.

One module of about 750 lines on purpose: the model card, the PyTorch backend, the ONNX
backend and the loader that picks one (its sections, marked below) share the card and its
private helpers, the ONNX export is made from and checked against the eager PyTorch model,
and the loader falls back from one backend to the other. Apart, each backend would import
the card's module and the loader both backends, for no reader's gain.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import logging
import math
import os
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from cxrsr.errors import PipelineError
from cxrsr.files import write_json_atomic
from cxrsr.model import int8
from cxrsr.model.weights import (
    PICKLED_MODULE,
    STATE_DICT,
    WeightsRefused,
    download_weights,
    load_state_dict,
    read_weights_bytes,
    weights_url,
)

log = logging.getLogger("cxrsr")

DEFAULT_WEIGHTS = "densenet121-res224-all"
#: What a score of the ``-all`` weights means; written to the results file and the SR.
OPERATING_POINT_SCORE = (
    "operating-point normalised score, not a probability: torchxrayvision rescales each "
    "label's sigmoid output so that 0.5 is that label's operating threshold"
)
#: Largest score difference allowed between the ONNX export and eager PyTorch.
ONNX_SCORE_TOLERANCE = 1e-4
#: Version of what the cached ONNX export computes; a cache made by another version is
#: exported again. 2: class activation maps as a second output; 3: the card records the
#: architecture and input size.
ONNX_EXPORT_VERSION = 3

#: torchxrayvision's architectures, by the prefix of their weights names: what the
#: results call them, and how their weights files hold the tensors.
ARCHITECTURES = {"densenet121": "DenseNet-121", "resnet50": "ResNet-50"}


def _spec(weights: str) -> dict[str, Any]:
    """torchxrayvision's entry for ``weights``, or a usage error listing the valid names."""
    import torchxrayvision as xrv

    names = weights_names()
    if weights not in names:
        raise PipelineError(f"unknown weights {weights!r}; choose one of: {', '.join(names)}", 2)
    return dict(xrv.models.model_urls[weights])


def weights_names() -> list[str]:
    """Every classifier's weights name torchxrayvision ships (its short aliases left out)."""
    import torchxrayvision as xrv

    return sorted(
        name
        for name in xrv.models.model_urls
        if any(name.startswith(f"{prefix}-") for prefix in ARCHITECTURES)
    )


def architecture_of(weights: str) -> str:
    """``DenseNet-121`` or ``ResNet-50``: the network a weights name belongs to."""
    return ARCHITECTURES[weights.split("-", 1)[0]]


def weights_table() -> list[dict[str, Any]]:
    """What ``--list-weights`` prints: each weights name, its labels, input size, file."""
    rows = []
    for name in weights_names():
        spec = _spec(name)
        rows.append(
            {
                "weights": name,
                "architecture": architecture_of(name),
                "input_size": int(spec["input_resolution"]),
                "file": os.path.basename(spec["weights_url"]),
                "labels": [label for label in spec["labels"] if label],
            }
        )
    return rows


def model_input_size(weights: str, cache_dir: str | os.PathLike[str] | None = None) -> int:
    """The input size (pixels per side) of ``weights``, known before the model loads.

    Read from a cached export's card when there is one (no PyTorch import), else from
    torchxrayvision's table: readers start preprocessing while the model still loads.
    """
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    card_path = _onnx_paths(weights, folder)[0]
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        return int(json.loads(card_path.read_text(encoding="utf-8"))["input_size"])
    return int(_spec(weights)["input_resolution"])


def default_cache_dir() -> Path:
    """torchxrayvision's weights folder (``xrv.utils.get_cache_dir()``), without importing it."""
    return Path(os.path.expanduser(os.path.join("~", ".torchxrayvision", "models_data")))


def torchxrayvision_version() -> str:
    return importlib.metadata.version("torchxrayvision")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def scores_from_logits(logits: np.ndarray, op_threshs: list[float] | None) -> np.ndarray:
    """torchxrayvision's output: sigmoid, then ``op_norm`` when thresholds exist.

    ``op_norm`` maps [0, t] to [0, 0.5] and [t, 1] to [0.5, 1] linearly per label, and
    leaves 0.5 where a label has no threshold (NaN).
    """
    from scipy.special import expit  # the overflow-free logistic function

    out = expit(np.asarray(logits, dtype=np.float32))
    if op_threshs is None:
        return out
    thresholds = np.broadcast_to(np.asarray(op_threshs, dtype=np.float32), out.shape)
    known = ~np.isnan(thresholds)
    below = (out < thresholds) & known
    above = ~(out < thresholds) & known
    new = np.full(out.shape, 0.5, dtype=np.float32)
    new[below] = out[below] / (thresholds[below] * 2)
    new[above] = 1.0 - (1.0 - out[above]) / ((1 - thresholds[above]) * 2)
    return new


@dataclass
class ModelCard:
    """What is known about the weights, without the network itself."""

    weights: str
    weights_file: Path
    weights_sha256: str
    outputs: list[str]
    """The model's output names in order (``model.pathologies``; '' marks an untrained output)."""
    op_threshs: list[float] | None
    torchxrayvision_version: str
    architecture: str = "DenseNet-121"
    input_size: int = 224
    """Pixels per side of the model's square input (``input_resolution``)."""

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """One image's input shape, ``(1, size, size)``."""
        return (1, self.input_size, self.input_size)

    @property
    def kept(self) -> list[int]:
        """Outputs that are trained and calibrated (a name, and a threshold if any are set)."""
        return [
            i
            for i, label in enumerate(self.outputs)
            if label and (self.op_threshs is None or not math.isnan(self.op_threshs[i]))
        ]

    def to_json(self) -> dict[str, Any]:
        return {
            "weights": self.weights,
            "weights_file": self.weights_file.name,
            "weights_sha256": self.weights_sha256,
            "outputs": self.outputs,
            "op_threshs": [None if math.isnan(t) else t for t in self.op_threshs]
            if self.op_threshs is not None
            else None,
            "torchxrayvision": self.torchxrayvision_version,
            "architecture": self.architecture,
            "input_size": self.input_size,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], folder: Path) -> ModelCard:
        thresholds = data["op_threshs"]
        return cls(
            weights=data["weights"],
            weights_file=folder / data["weights_file"],
            weights_sha256=data["weights_sha256"],
            outputs=list(data["outputs"]),
            op_threshs=[math.nan if t is None else float(t) for t in thresholds]
            if thresholds is not None
            else None,
            torchxrayvision_version=data["torchxrayvision"],
            architecture=str(data["architecture"]),
            input_size=int(data["input_size"]),
        )


@dataclass
class Classifier:
    """A loaded model: provenance, labels and ``predict`` over batches of inputs."""

    card: ModelCard
    device: str
    backend: str
    _network: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]] = field(repr=False)
    precision: str = "fp32"
    int8_sha256: str | None = None
    """SHA-256 of the quantized ONNX model that runs, for ``precision == "int8"``."""

    @property
    def input_size(self) -> int:
        """Pixels per side of the model's square input."""
        return self.card.input_size

    @property
    def labels(self) -> list[str]:
        """Labels reported, in the model's own order (untrained outputs left out)."""
        return [self.card.outputs[i] for i in self.card.kept]

    def describe(self) -> dict[str, Any]:
        """The ``model`` block of the results file."""
        card = self.card
        excluded = [
            label or f"output {i}" for i, label in enumerate(card.outputs) if i not in card.kept
        ]
        return {
            "weights": card.weights,
            "weights_file": card.weights_file.name,
            "weights_sha256": card.weights_sha256,
            "torchxrayvision": card.torchxrayvision_version,
            "architecture": card.architecture,
            "input_size": card.input_size,
            "labels": self.labels,
            "excluded_labels": excluded,
            "threshold": 0.5,
            "score_kind": OPERATING_POINT_SCORE
            if card.op_threshs is not None
            else "sigmoid output (these weights define no operating thresholds)",
            "preprocessing": (
                "stored values (after the Modality LUT) scaled to [-1024, 1024] by the declared "
                "bit depth, MONOCHROME1 inverted; center crop; anti-aliased resize to "
                f"{card.input_size}x{card.input_size}"
            ),
            "precision": self.precision,
            **(
                {"int8_onnx_sha256": self.int8_sha256, "quantization": int8.CALIBRATION_NOTE}
                if self.precision == "int8"
                else {}
            ),
        }

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """Raw network outputs for a float32 batch ``(N, 1, size, size)``."""
        return self._network(np.ascontiguousarray(batch, dtype=np.float32))[0]

    def predict(self, batch: np.ndarray) -> list[dict[str, float]]:
        """Scores per image as ``{label: score}``, unrounded (see :meth:`predict_with_maps`)."""
        return self.predict_with_maps(batch)[0]

    def predict_with_maps(
        self, batch: np.ndarray
    ) -> tuple[list[dict[str, float]], list[dict[str, np.ndarray]]]:
        """Scores per image, and each label's class activation map (float32; 7x7 for the
        224 DenseNets, 16x16 for the 512 ResNet: the input size over 32).

        The maps come out of the same forward pass (see :func:`_network_module`), so they
        cost almost nothing. Scores are the network's float32 values, unrounded: findings
        and heatmaps are decided on them, and only what is stored or shown is rounded
        (:func:`cxrsr.results.rounded_score`).
        """
        logits, cams = self._network(np.ascontiguousarray(batch, dtype=np.float32))
        scores = scores_from_logits(logits, self.card.op_threshs)
        kept, outputs = self.card.kept, self.card.outputs
        return (
            [{outputs[k]: float(row[k]) for k in kept} for row in scores],
            [{outputs[k]: maps[k] for k in kept} for maps in cams],
        )


# --------------------------------------------------------------------------- PyTorch


def _network_module(model: Any) -> Any:
    """The network up to the classifier (no score post-processing), and its class activation maps.

    Both architectures end ``last feature map -> global average pool -> one Linear``:
    torchxrayvision's ``DenseNet`` as ``relu(features) -> pool -> classifier``, its
    ``ResNet`` as torchvision's ``layer4 -> avgpool -> fc``. So each logit is the spatial
    mean of ``sum_c w_kc * F_c`` plus a bias: that sum over the last feature map ``F`` is
    label k's class activation map (Zhou et al., CVPR 2016), the input size over 32 on a
    side. It is a 1x1 convolution with the classifier's weights, computed in the same pass.
    The wrapper skips torchxrayvision's own resizing (``fix_resolution``): inputs are
    already at the model's size.
    """
    import torch
    import torch.nn.functional as F

    resnet = getattr(model, "model", None) if not hasattr(model, "classifier") else None

    class _Network(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner
            self.head = inner.fc if resnet is not None else inner.classifier

        def features(self, x: torch.Tensor) -> torch.Tensor:
            if resnet is None:
                return F.relu(self.inner.features(x))
            r = self.inner
            x = r.maxpool(r.relu(r.bn1(r.conv1(x))))
            return r.layer4(r.layer3(r.layer2(r.layer1(x))))

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            features = self.features(x)
            pooled = F.adaptive_avg_pool2d(features, (1, 1)).flatten(1)
            weight = self.head.weight
            cams = F.conv2d(features, weight[:, :, None, None])
            return self.head(pooled), cams

    # eval() matters: exporters restore the wrapper's training flag on every submodule,
    # and a wrapper left in training mode would switch BatchNorm to batch statistics.
    return _Network(resnet if resnet is not None else model).eval()


def _empty_resnet(weights: str, outputs: int) -> Any:
    """``xrv.models.ResNet`` as its constructor builds it, without its ``torch.load``.

    torchxrayvision's constructor always reads the weights file with
    ``torch.load(weights_only=False)``; this builds the same modules (torchvision's
    ResNet-50 with a one-channel ``conv1``) for tensors read as data to fill.
    """
    import torch
    import torchvision
    import torchxrayvision as xrv

    model = xrv.models.ResNet.__new__(xrv.models.ResNet)
    torch.nn.Module.__init__(model)
    model.weights = weights
    model.apply_sigmoid = False
    model.model = torchvision.models.resnet50(num_classes=outputs, weights=None)
    model.model.conv1 = torch.nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return model


def load_torch_model(
    weights: str, cache_dir: Path, expected_sha256: str | None = None
) -> tuple[Any, ModelCard]:
    """torchxrayvision's classifier with its weights read as data (:mod:`cxrsr.model.weights`).

    The file is downloaded once (:func:`~cxrsr.model.weights.download_weights`); then its bytes
    are checked against ``expected_sha256`` (if given) before anything is unpickled, and
    its tensors are loaded into a network built as ``xrv.models.DenseNet(weights=...)`` or
    ``xrv.models.ResNet(weights=...)`` builds it, without torchxrayvision's
    ``torch.load(weights_only=False)``.
    """
    import torch
    import torchxrayvision as xrv

    spec = _spec(weights)
    architecture = architecture_of(weights)
    url = weights_url(spec["weights_url"])
    path = cache_dir / os.path.basename(spec["weights_url"])
    fix = (
        f"offline? download {url} on a machine with internet access and copy it to {path} "
        f"(or pass --cache-dir with the folder that holds it)"
    )
    if not path.is_file():
        log.info("downloading weights %s to %s (once)", weights, path)
        try:
            download_weights(url, path)
        except Exception as exc:
            path.unlink(missing_ok=True)  # never leave a partial download behind
            reason = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
            raise PipelineError(
                f"cannot download weights {weights} ({type(exc).__name__}: {reason}); {fix}", 3
            ) from exc
    data, digest = read_weights_bytes(path, expected_sha256)
    if architecture == "ResNet-50":
        state = load_state_dict(data, path, STATE_DICT)
        model = _empty_resnet(weights, len(spec["labels"]))
        target = model.model  # torchxrayvision loads the file into the torchvision ResNet
    else:
        state = load_state_dict(data, path, PICKLED_MODULE)
        model = target = xrv.models.DenseNet(num_classes=len(spec["labels"]))
    try:
        target.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = str(exc).splitlines()[0]
        raise WeightsRefused(
            f"weights file {path} refused: its tensors do not fit {weights} ({detail})"
        ) from exc
    # What DenseNet(weights=...) / ResNet(weights=...) set besides the tensors (1.5.7).
    model.weights = weights
    model.targets = model.pathologies = list(spec["labels"])
    model.weights_filename_local = str(path)
    if "op_threshs" in spec:
        model.op_threshs = torch.tensor(spec["op_threshs"])
    if "input_resolution" in spec:
        model.input_resolution = spec["input_resolution"]
    thresholds = getattr(model, "op_threshs", None)
    card = ModelCard(
        weights=weights,
        weights_file=path,
        weights_sha256=digest,
        outputs=list(model.pathologies),
        op_threshs=[float(t) for t in thresholds] if thresholds is not None else None,
        torchxrayvision_version=xrv.__version__,
        architecture=architecture,
        input_size=int(spec["input_resolution"]),
    )
    return model.eval(), card


def _eager_network(
    model: Any, device: str, half: bool = False
) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Eager PyTorch in channels-last memory format; ``half``: weights and activations in
    fp16 (for tensor cores), outputs returned in float32."""
    import torch

    dtype = torch.float16 if half else torch.float32
    module = _network_module(model.to(device, dtype).to(memory_format=torch.channels_last))

    def run(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with torch.inference_mode():
            tensor = (
                torch.from_numpy(batch)
                .to(device, dtype)
                .contiguous(memory_format=torch.channels_last)
            )
            logits, cams = module(tensor)
            return logits.float().cpu().numpy(), cams.float().cpu().numpy()

    return run


# --------------------------------------------------------------------------- ONNX


def _onnx_paths(card_or_weights: ModelCard | str, cache_dir: Path) -> tuple[Path, Path]:
    weights = card_or_weights if isinstance(card_or_weights, str) else card_or_weights.weights
    folder = cache_dir / "cxrsr-onnx"
    return folder / f"{weights}.json", folder / f"{weights}.onnx"


def _cached_onnx(
    weights: str, cache_dir: Path, expected_sha256: str | None = None
) -> tuple[ModelCard, bytes] | None:
    """A previous export of these weights and its bytes, if it is still theirs.

    The card binds the export to the weights it was made from: the weights file must
    still hash to the card's ``weights_sha256`` (and to ``expected_sha256`` when given),
    and the ONNX bytes to its ``onnx_sha256``. A cache edited by hand, or left from other
    weights, is not used (the export is made again). The bytes are hashed and given to
    ONNX Runtime from memory, so the file cannot change in between; an ONNX model is a
    protobuf graph of standard operators, and ONNX Runtime runs no code from it (custom
    operator libraries are loaded only when the host program registers them; we do not).
    """
    card_path, onnx_path = _onnx_paths(weights, cache_dir)
    try:
        data = json.loads(card_path.read_text(encoding="utf-8"))
        card = ModelCard.from_json(data, cache_dir)
        onnx_sha256 = str(data["onnx_sha256"])
        onnx_bytes = onnx_path.read_bytes()
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if (
        not card.weights_file.is_file()
        or card.weights != weights
        or data.get("export_version") != ONNX_EXPORT_VERSION
        or card.torchxrayvision_version != torchxrayvision_version()
        or (expected_sha256 is not None and card.weights_sha256 != expected_sha256.lower())
        or sha256_of(card.weights_file) != card.weights_sha256
        or hashlib.sha256(onnx_bytes).hexdigest() != onnx_sha256
    ):
        return None
    return card, onnx_bytes


def _export_onnx(model: Any, card: ModelCard, cache_dir: Path) -> None:
    """Export the logits network, check it against eager PyTorch, then publish it."""
    import torch

    card_path, onnx_path = _onnx_paths(card, cache_dir)
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = onnx_path.with_name(f".{onnx_path.name}.{os.getpid()}.tmp")
    # A plausible image: torchxrayvision warns about inputs outside [-1024, 1024].
    example = torch.linspace(-1024, 1024, card.input_size**2).reshape(1, *card.input_shape)
    try:
        with torch.no_grad(), contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():
            # The exporter's deprecation and tracer notes are about its own internals.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                _network_module(model),
                (example,),
                str(tmp),
                input_names=["input"],
                output_names=["logits", "cams"],
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}, "cams": {0: "batch"}},
                opset_version=17,
                dynamo=False,
            )
        drift = _max_score_drift(_onnx_network(tmp), _eager_network(model, "cpu"), card)
        if drift > ONNX_SCORE_TOLERANCE:
            raise RuntimeError(f"ONNX scores differ from eager PyTorch by {drift:.2g}")
        onnx_sha256 = sha256_of(tmp)
        os.replace(tmp, onnx_path)
    finally:
        tmp.unlink(missing_ok=True)
    write_json_atomic(
        card_path,
        {**card.to_json(), "onnx_sha256": onnx_sha256, "export_version": ONNX_EXPORT_VERSION},
    )


def _max_score_drift(
    fast: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
    eager: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
    card: ModelCard,
) -> float:
    """Largest score difference, or class activation map difference relative to its spread."""
    rng = np.random.default_rng(0)
    batch = rng.uniform(-1024, 1024, size=(2, *card.input_shape)).astype(np.float32)
    (fast_logits, fast_cams), (eager_logits, eager_cams) = fast(batch), eager(batch)
    a = scores_from_logits(fast_logits, card.op_threshs)
    b = scores_from_logits(eager_logits, card.op_threshs)
    spread = float(np.ptp(eager_cams)) or 1.0
    cam_drift = float(np.max(np.abs(fast_cams - eager_cams))) / spread
    return max(float(np.max(np.abs(a - b))), cam_drift)


#: ONNX Runtime's execution providers for the CPU and for NVIDIA GPUs (onnxruntime-gpu).
CPU_PROVIDER, CUDA_PROVIDER = "CPUExecutionProvider", "CUDAExecutionProvider"


def onnx_providers(device: str, available: list[str]) -> list[str]:
    """The execution providers a session on ``device`` (``cpu`` or ``cuda``) asks for.

    ``available``: ``onnxruntime.get_available_providers()``. The CUDA provider ships only
    in the onnxruntime-gpu package; without it ``cuda`` is an environment problem (exit 3).
    """
    if device == "cpu":
        return [CPU_PROVIDER]
    if CUDA_PROVIDER not in available:
        raise PipelineError(
            "--device cuda: the installed onnxruntime has no CUDA provider; install "
            "onnxruntime-gpu in its place (pip install onnxruntime-gpu), or use --device cpu",
            3,
        )
    return [CUDA_PROVIDER, CPU_PROVIDER]


def check_session_device(device: str, active: list[str]) -> None:
    """Refuse (exit 3) a CUDA session that ONNX Runtime quietly put on the CPU.

    ``active``: ``session.get_providers()``. ONNX Runtime falls back to the CPU when the
    CUDA provider cannot start (no GPU, no driver, a CUDA or cuDNN library missing).
    """
    if device == "cuda" and (not active or active[0] != CUDA_PROVIDER):
        raise PipelineError(
            "--device cuda: ONNX Runtime's CUDA provider found no usable GPU (no device, or "
            "its driver, CUDA or cuDNN libraries missing); use --device cpu",
            3,
        )


def _onnx_network(
    model: Path | bytes, device: str = "cpu"
) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    # ONNX Runtime's worker threads spin between runs, waiting for the next one. Here the
    # cores are shared with the reader processes and the heatmap writer, which the spinning
    # starves: without it, bench/bench_process.py --count 100 made 17.0-17.4 images/s with
    # the default heatmaps instead of 13.7-15.0, with less CPU (10.2 s against 12 s).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    source = model if isinstance(model, bytes) else str(model)
    providers = onnx_providers(device, onnxruntime.get_available_providers())
    session = onnxruntime.InferenceSession(source, options, providers=providers)
    check_session_device(device, session.get_providers())

    def run(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits, cams = session.run(None, {"input": batch})
        return logits, cams

    return run


def _has_onnxruntime() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


# --------------------------------------------------------------------------- entry point


def resolve_device(device: str) -> str:
    """``auto`` is CUDA when a GPU is visible, else the CPU (asks PyTorch only when needed)."""
    if device == "cpu":
        return device
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not torch.cuda.is_available():
        raise PipelineError(f"--device {device}: no CUDA device is available", 3)
    return device


def load_classifier(
    weights: str = DEFAULT_WEIGHTS,
    cache_dir: str | os.PathLike[str] | None = None,
    device: str = "auto",
    backend: str = "auto",
    weights_sha256: str | None = None,
    precision: str = "fp32",
) -> Classifier:
    """The fastest backend that reproduces torchxrayvision's eager model on this device.

    ``weights_sha256``: the weights file must have this SHA-256 before anything in it is
    unpickled (and a cached ONNX export must have been made from such a file).
    ``precision``: ``fp32``, ``int8`` (:mod:`cxrsr.model.int8`: ONNX Runtime on the CPU) or
    ``fp16`` (eager PyTorch on a CUDA GPU).
    """
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if precision == "int8":
        return _int8_classifier(weights, folder, device, backend, weights_sha256)
    if precision == "fp16":
        return _fp16_classifier(weights, folder, device, backend, weights_sha256)
    if precision != "fp32":
        raise PipelineError(f"--precision {precision}: choose fp32, int8 or fp16", 2)
    want_onnx = backend in ("auto", "onnx") and device in ("auto", "cpu") and _has_onnxruntime()
    if want_onnx and (device == "cpu" or not _cuda_visible()):
        cached = _cached_onnx(weights, folder, weights_sha256)
        if cached is not None:
            return Classifier(cached[0], "cpu", "onnx", _onnx_network(cached[1]))
    if backend == "onnx" and not _has_onnxruntime():
        raise PipelineError("--backend onnx needs the onnxruntime package", 2)
    if device == "cuda" and backend == "onnx":
        return _onnx_cuda_classifier(weights, folder, weights_sha256)
    device = resolve_device(device)
    model, card = load_torch_model(weights, folder, weights_sha256)
    if device == "cpu" and want_onnx:
        try:
            _export_onnx(model, card, folder)
            return Classifier(card, "cpu", "onnx", _onnx_network(_onnx_paths(card, folder)[1]))
        except Exception as exc:  # export problems must not stop a batch: eager still works
            log.warning("ONNX export unavailable (%s); using eager PyTorch", exc)
    return Classifier(card, device, "eager", _eager_network(model, device))


class ModelOptions(Protocol):
    """What names a model: the shared model options (:func:`cxrsr.cli.add_model_options`)
    or the Ray engine's picklable spec of them."""

    @property
    def weights(self) -> str: ...
    @property
    def cache_dir(self) -> str | os.PathLike[str] | None: ...
    @property
    def device(self) -> str: ...
    @property
    def backend(self) -> str: ...
    @property
    def weights_sha256(self) -> str | None: ...
    @property
    def precision(self) -> str: ...


def classifier_from_options(args: ModelOptions) -> Classifier:
    """The model that ``--weights``, ``--cache-dir``, ``--device``, ``--backend``,
    ``--weights-sha256`` and ``--precision`` name, for every script and engine that classifies."""
    return load_classifier(
        args.weights,
        args.cache_dir,
        args.device,
        args.backend,
        args.weights_sha256,
        args.precision,
    )


def _cuda_visible() -> bool:
    """Whether a CUDA GPU could be present, without importing PyTorch (for ``--device auto``)."""
    return os.path.exists("/dev/nvidia0") or os.path.exists("/dev/nvidiactl")


def _int8_classifier(
    weights: str, folder: Path, device: str, backend: str, weights_sha256: str | None
) -> Classifier:
    """The int8 quantization of the fp32 ONNX export, made once and cached beside it."""
    if backend == "eager" or device == "cuda":
        raise PipelineError(
            "--precision int8 runs through ONNX Runtime on the CPU: use it with "
            "--backend auto or onnx, and --device cpu or auto",
            2,
        )
    if not _has_onnxruntime():
        raise PipelineError("--precision int8 needs the onnxruntime package", 3)
    fp32 = load_classifier(weights, folder, "cpu", "onnx", weights_sha256)
    cached = _cached_onnx(weights, folder, weights_sha256) if fp32.backend == "onnx" else None
    if cached is None:
        raise PipelineError(f"--precision int8: no ONNX export of {weights} could be made", 3)
    card, fp32_bytes = cached
    fp32_sha256 = hashlib.sha256(fp32_bytes).hexdigest()
    found = int8.cached_int8(weights, folder, fp32_sha256)
    if found is None:
        log.info("quantizing %s to int8 (once)", weights)
        int8.quantize(weights, folder, fp32_bytes, fp32_sha256, card.input_size)
        found = int8.cached_int8(weights, folder, fp32_sha256)
        if found is None:
            raise PipelineError(f"--precision int8: the int8 model of {weights} was not kept", 3)
    data, digest = found
    return Classifier(card, "cpu", "onnx", _onnx_network(data), "int8", digest)


def _onnx_cuda_classifier(weights: str, folder: Path, weights_sha256: str | None) -> Classifier:
    """The fp32 ONNX export (made and checked on the CPU) run by ONNX Runtime's CUDA provider."""
    import onnxruntime

    onnx_providers("cuda", onnxruntime.get_available_providers())  # exit 3 before any work
    load_classifier(weights, folder, "cpu", "onnx", weights_sha256)  # makes the export
    cached = _cached_onnx(weights, folder, weights_sha256)
    if cached is None:
        raise PipelineError(f"--device cuda: no ONNX export of {weights} could be made", 3)
    card, data = cached
    return Classifier(card, "cuda", "onnx", _onnx_network(data, "cuda"))


def _fp16_classifier(
    weights: str, folder: Path, device: str, backend: str, weights_sha256: str | None
) -> Classifier:
    """Eager PyTorch in fp16 on a CUDA GPU: half the memory traffic, tensor cores.

    Not on the CPU, where PyTorch's fp16 convolutions are many times slower than fp32.
    """
    if device == "cpu" or backend == "onnx":
        raise PipelineError(
            "--precision fp16 runs eager PyTorch on a CUDA GPU: use --device cuda (or auto) "
            "and --backend auto or eager",
            2,
        )
    device = resolve_device("cuda")  # exit 3 without a GPU
    model, card = load_torch_model(weights, folder, weights_sha256)
    return Classifier(card, device, "eager", _eager_network(model, device, half=True), "fp16")
