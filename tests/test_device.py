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
