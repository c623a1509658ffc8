"""Load a torchxrayvision DenseNet and run it in batches, eagerly or through ONNX Runtime.

Weights are loaded through torchxrayvision's own ``DenseNet(weights=..., cache_dir=...)``,
which downloads the file once; when that fails (offline machines, firewalls) the error
says which file to put where.

Scores are torchxrayvision's: ``op_norm(sigmoid(logits))`` for weights with operating
thresholds, so 0.5 is each label's threshold. Only the logits are computed by the
chosen backend; the sigmoid and ``xrv.models.op_norm`` always run in torch, so the
score definition is the library's own whatever the backend.

Backends, all fp32:

- ``eager``: PyTorch in channels-last memory format (same operations as the reference
  model, about 2x faster on CPU through oneDNN's NHWC convolutions);
- ``onnx``: the same network exported to ONNX and run by ONNX Runtime (CPU only; about
  3x faster than plain eager here). Checked against the eager model at load time.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import math
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cxrsr.errors import PipelineError

log = logging.getLogger("cxrsr")

DEFAULT_WEIGHTS = "densenet121-res224-all"
#: Largest difference in score allowed between the ONNX and eager paths at the load check.
ONNX_SCORE_TOLERANCE = 1e-4


def densenet_weight_names() -> list[str]:
    """Every DenseNet weights name torchxrayvision knows."""
    import torchxrayvision as xrv

    return sorted(name for name in xrv.models.model_urls if name.startswith("densenet"))


def weights_path(weights: str, cache_dir: str | os.PathLike[str] | None) -> Path:
    """Where torchxrayvision keeps (or will download) the weights file."""
    import torchxrayvision as xrv

    url = xrv.models.model_urls[weights]["weights_url"]
    folder = cache_dir if cache_dir is not None else xrv.utils.get_cache_dir()
    return Path(os.path.expanduser(os.path.join(folder, os.path.basename(url))))


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def resolve_device(device: str) -> str:
    """``auto`` is CUDA when a GPU is visible, else the CPU."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise PipelineError("--device cuda: no CUDA device is available", exit_code=2)
    return device


@dataclass
class Classifier:
    """A loaded model: labels, provenance and a ``predict`` over batches of inputs."""

    weights: str
    weights_file: Path
    weights_sha256: str
    labels: list[str]
    """Labels reported, in the model's own order (untrained outputs left out)."""
    excluded_labels: list[str]
    device: str
    backend: str
    torchxrayvision_version: str
    _model: Any = field(repr=False)
    _keep: list[int] = field(repr=False)
    _session: Any = field(default=None, repr=False)

    def describe(self) -> dict[str, Any]:
        """The ``model`` block of the results file."""
        return {
            "weights": self.weights,
            "weights_file": self.weights_file.name,
            "weights_sha256": self.weights_sha256,
            "torchxrayvision": self.torchxrayvision_version,
            "architecture": "DenseNet-121",
            "labels": self.labels,
            "excluded_labels": self.excluded_labels,
            "threshold": 0.5,
            "score_kind": _score_kind(self._model),
            "preprocessing": (
                "stored values (after Modality LUT) scaled to [-1024, 1024] by the declared "
                "bit depth, MONOCHROME1 inverted; center crop; anti-aliased resize to 224x224"
            ),
            "precision": "fp32",
        }

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """Raw network outputs for a float32 batch ``(N, 1, 224, 224)``."""
        import torch

        if self._session is not None:
            return self._session.run(None, {"input": np.ascontiguousarray(batch)})[0]
        with torch.inference_mode():
            tensor = torch.from_numpy(batch).to(self.device)
            tensor = tensor.contiguous(memory_format=torch.channels_last)
            return _logits_module(self._model)(tensor).float().cpu().numpy()

    def predict(self, batch: np.ndarray) -> list[dict[str, float]]:
        """Scores per image as ``{label: score}``, rounded to 6 decimals for stable files."""
        scores = scores_from_logits(self._model, self.logits(batch))
        return [
            {self.labels[i]: round(float(row[k]), 6) for i, k in enumerate(self._keep)}
            for row in scores
        ]


def _score_kind(model: Any) -> str:
    from cxrsr.results import OPERATING_POINT_SCORE

    if getattr(model, "op_threshs", None) is not None:
        return OPERATING_POINT_SCORE
    return "sigmoid output (these weights define no operating thresholds)"


def scores_from_logits(model: Any, logits: np.ndarray) -> np.ndarray:
    """torchxrayvision's output definition applied to logits (sigmoid, then op_norm)."""
    import torch
    import torchxrayvision as xrv

    out = torch.sigmoid(torch.from_numpy(np.asarray(logits, dtype=np.float32)))
    if getattr(model, "op_threshs", None) is not None:
        out = xrv.models.op_norm(out, model.op_threshs.float().cpu())
    return out.numpy()


def _logits_module(model: Any) -> Any:
    """The network up to the classifier, without the score post-processing."""
    import torch

    class _Logits(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner.classifier(self.inner.features2(x))

    # eval() matters: exporters restore the wrapper's training flag on every submodule,
    # and a wrapper left in training mode would switch BatchNorm to batch statistics.
    return _Logits(model).eval()


def _load_densenet(weights: str, cache_dir: str | os.PathLike[str] | None) -> tuple[Any, Path]:
    import torchxrayvision as xrv

    path = weights_path(weights, cache_dir)
    url = xrv.models.model_urls[weights]["weights_url"]
    fix = (
        f"download {url} on a machine with internet access and copy it to {path} "
        f"(or pass --cache-dir with the folder that holds it)"
    )
    downloading = not path.is_file()
    if downloading:
        log.info("downloading weights %s to %s (once)", weights, path)
    captured = io.StringIO()
    try:
        # torchxrayvision prints its download chatter; keep stdout clean for the user.
        with contextlib.redirect_stdout(captured):
            model = xrv.models.DenseNet(
                weights=weights, cache_dir=str(cache_dir) if cache_dir else None
            )
    except Exception as exc:
        if downloading:
            path.unlink(missing_ok=True)  # never leave a partial download behind
            raise PipelineError(
                f"cannot download weights {weights} ({type(exc).__name__}: {exc}); {fix}",
                exit_code=3,
            ) from exc
        raise PipelineError(
            f"weights file {path} is unreadable ({type(exc).__name__}: {exc}); delete it and "
            f"rerun to download it again, or {fix}",
            exit_code=3,
        ) from exc
    return model.eval(), path


def _onnx_session(model: Any, sha256: str, cache_dir: Path | None) -> Any:
    """Export the logits network to ONNX once per weights file and open it with ONNX Runtime."""
    import onnxruntime
    import torch

    folder = (cache_dir or Path(tempfile.gettempdir())) / "cxrsr-onnx"
    onnx_path = folder / f"{sha256[:16]}-torch{torch.__version__.split('+')[0]}.onnx"
    if not onnx_path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        tmp = onnx_path.with_suffix(f".{os.getpid()}.tmp")
        # A plausible image: torchxrayvision warns on inputs outside [-1024, 1024].
        example = torch.linspace(-1024, 1024, 224 * 224).reshape(1, 1, 224, 224)
        with torch.no_grad(), contextlib.redirect_stdout(sys.stderr):
            torch.onnx.export(
                _logits_module(model),
                (example,),
                str(tmp),
                input_names=["input"],
                output_names=["logits"],
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                opset_version=17,
                dynamo=False,
            )
        os.replace(tmp, onnx_path)
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    return onnxruntime.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])


def check_backend_against_eager(classifier: Classifier) -> float:
    """Largest score difference between the chosen backend and eager PyTorch on test inputs."""
    rng = np.random.default_rng(0)
    batch = rng.uniform(-1024, 1024, size=(2, 1, 224, 224)).astype(np.float32)
    import torch

    with torch.inference_mode():
        eager = classifier._model(torch.from_numpy(batch)).numpy()
    fast = scores_from_logits(classifier._model, classifier.logits(batch))
    return float(np.max(np.abs(eager - fast)))


def load_classifier(
    weights: str = DEFAULT_WEIGHTS,
    cache_dir: str | os.PathLike[str] | None = None,
    device: str = "auto",
    backend: str = "auto",
) -> Classifier:
    """Load the weights and prepare the fastest backend that reproduces the eager model."""
    import torch
    import torchxrayvision as xrv

    names = densenet_weight_names()
    if weights not in names:
        raise PipelineError(f"unknown weights {weights!r}; choose one of: {', '.join(names)}", 2)
    device = resolve_device(device)
    model, path = _load_densenet(weights, cache_dir)
    model = model.to(device).to(memory_format=torch.channels_last)
    thresholds = getattr(model, "op_threshs", None)
    keep, labels, excluded = [], [], []
    for index, label in enumerate(model.pathologies):
        untrained = not label or (thresholds is not None and math.isnan(float(thresholds[index])))
        if untrained:
            excluded.append(label or f"output {index}")
        else:
            keep.append(index)
            labels.append(label)
    sha256 = sha256_of(path)
    if backend == "auto":
        backend = "onnx" if device == "cpu" and _has_onnxruntime() else "eager"
    if backend == "onnx" and device != "cpu":
        raise PipelineError("--backend onnx runs on the CPU only; use --backend eager", 2)
    classifier = Classifier(
        weights=weights,
        weights_file=path,
        weights_sha256=sha256,
        labels=labels,
        excluded_labels=excluded,
        device=device,
        backend="eager",
        torchxrayvision_version=xrv.__version__,
        _model=model,
        _keep=keep,
    )
    if backend == "onnx":
        try:
            classifier._session = _onnx_session(model.cpu(), sha256, Path(path).parent)
            classifier.backend = "onnx"
            drift = check_backend_against_eager(classifier)
            if drift > ONNX_SCORE_TOLERANCE:
                log.warning("ONNX scores differ from eager by %.2g; using eager PyTorch", drift)
                classifier._session, classifier.backend = None, "eager"
        except Exception as exc:  # export or runtime problems must not stop a batch
            log.warning("ONNX Runtime unavailable (%s); using eager PyTorch", exc)
            classifier._session, classifier.backend = None, "eager"
    return classifier


def _has_onnxruntime() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True
