"""``--device cuda`` through ONNX Runtime's CUDA provider: which providers a session asks for,
and the one-line exit 3 when the onnxruntime-gpu package or a usable GPU is missing.

The selection is tested here on the CPU (the functions take the provider lists ONNX Runtime
reports); ``bench/bench_gpu.py`` runs the same path on a GPU host.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import run_script

from cxrsr.errors import PipelineError
from cxrsr.model.classifier import (
    CPU_PROVIDER,
    CUDA_PROVIDER,
    check_session_device,
    onnx_providers,
)


def test_cpu_asks_for_the_cpu_provider_only() -> None:
    assert onnx_providers("cpu", [CUDA_PROVIDER, CPU_PROVIDER]) == [CPU_PROVIDER]


def test_cuda_asks_for_cuda_then_the_cpu_for_unsupported_operators() -> None:
    assert onnx_providers("cuda", ["TensorrtExecutionProvider", CUDA_PROVIDER, CPU_PROVIDER]) == [
        CUDA_PROVIDER,
        CPU_PROVIDER,
    ]


def test_cuda_without_onnxruntime_gpu_is_an_environment_problem() -> None:
    with pytest.raises(PipelineError, match="install onnxruntime-gpu") as error:
        onnx_providers("cuda", ["AzureExecutionProvider", CPU_PROVIDER])
    assert error.value.exit_code == 3


def test_a_session_that_fell_back_to_the_cpu_is_refused() -> None:
    check_session_device("cuda", [CUDA_PROVIDER, CPU_PROVIDER])
    check_session_device("cpu", [CPU_PROVIDER])
    with pytest.raises(PipelineError, match="found no usable GPU") as error:
        check_session_device("cuda", [CPU_PROVIDER])
    assert error.value.exit_code == 3


def test_device_cuda_on_this_host_exits_3_with_one_line(
    weights_cache_dir: Path, corpus_dir: Path, tmp_path: Path
) -> None:
    import onnxruntime

    if CUDA_PROVIDER in onnxruntime.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed here: bench/bench_gpu.py covers this host")
    proc = run_script(
        "process_dicom.py",
        corpus_dir / "cxr11_siim_cr_jpeg8.dcm",
        "--device",
        "cuda",
        "--backend",
        "onnx",
        "--workers",
        "0",
        "--cache-dir",
        weights_cache_dir,
        "-o",
        tmp_path / "results.json",
    )
    assert proc.returncode == 3, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("E: --device cuda: "), proc.stderr
    assert "onnxruntime-gpu" in lines[0]


def test_fp16_is_for_cuda_only(weights_cache_dir: Path) -> None:
    import torch

    from cxrsr.model.classifier import load_classifier

    with pytest.raises(PipelineError, match="fp16 runs eager PyTorch on a CUDA GPU") as error:
        load_classifier(cache_dir=weights_cache_dir, device="cpu", precision="fp16")
    assert error.value.exit_code == 2
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: bench/bench_gpu.py measures fp16 there")
    with pytest.raises(PipelineError, match="no CUDA device") as error:
        load_classifier(cache_dir=weights_cache_dir, device="cuda", precision="fp16")
    assert error.value.exit_code == 3


def test_fp16_network_stays_near_fp32(tmp_path: Path) -> None:
    """The fp16 path's arithmetic, run on the CPU (slowly) since no GPU is here: logits come
    back as float32 and within 2 % of their spread of the fp32 ones (random weights with a
    scaled classifier layer: the mechanism, not clinical drift)."""
    import numpy as np
    from test_models_all import rescaled_inputs, save_densenet

    from cxrsr.model.classifier import _eager_network, load_torch_model

    save_densenet(tmp_path, "densenet121-res224-all", seed=5)
    model, _ = load_torch_model("densenet121-res224-all", tmp_path)
    batch = rescaled_inputs(224)
    full = _eager_network(model, "cpu")(batch)[0]
    half_logits, half_cams = _eager_network(model, "cpu", half=True)(batch)
    assert half_logits.dtype == half_cams.dtype == np.float32
    spread = float(np.ptp(full))
    assert float(np.abs(half_logits - full).max()) <= 0.02 * spread
