"""The backend switch: env var, setter, context manager, and where Triton may run."""

from __future__ import annotations

import sys

import pytest
import torch

from blocktrain import kernels
from blocktrain.kernels import dispatch

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def _args(width=12, n_blocks=3):
    return (torch.randn(4, width), torch.randn(5, width), None, torch.randn(2, width // n_blocks),
            torch.randn(5, 2), 0.5, n_blocks)


def test_auto_picks_triton_only_for_cuda_tensors_of_a_supported_dtype(monkeypatch):
    monkeypatch.setattr(dispatch, "triton_available", lambda: True)
    assert dispatch.get_backend() == "auto"
    assert dispatch.select(CPU, torch.float32) == "reference"
    assert dispatch.select(CUDA, torch.float32) == "triton"
    assert dispatch.select(CUDA, torch.bfloat16) == "triton"
    assert dispatch.select(CUDA, torch.float64) == "reference"
    monkeypatch.setattr(dispatch, "triton_available", lambda: False)
    assert dispatch.select(CUDA, torch.float32) == "reference"


def test_interpret_mode_alone_does_not_route_auto_to_triton(monkeypatch):
    monkeypatch.setattr(dispatch, "triton_available", lambda: True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dispatch.select(CPU, torch.float32) == "reference"


def test_env_var_forces_a_backend(monkeypatch):
    monkeypatch.setattr(dispatch, "triton_available", lambda: True)
    monkeypatch.setenv(dispatch.ENV_VAR, "reference")
    assert dispatch.select(CUDA, torch.float32) == "reference"
    monkeypatch.setenv(dispatch.ENV_VAR, " Triton ")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dispatch.select(CPU, torch.float32) == "triton"
    monkeypatch.setenv(dispatch.ENV_VAR, "cuda")
    with pytest.raises(ValueError, match="BLOCKTRAIN_KERNELS.*auto, triton, compiled, reference"):
        dispatch.get_backend()


def test_compiled_cpu_loops_are_one_more_backend_of_the_same_dispatch(monkeypatch):
    monkeypatch.setattr(dispatch, "triton_available", lambda: True)
    built, broken = (lambda: True), (lambda: False)
    assert dispatch.select(CPU, torch.float32, compiled=built) == "compiled"  # auto: an op's C loop on the CPU
    assert dispatch.select(CPU, torch.float32, compiled=broken) == "reference"  # no compiler: the reference
    assert dispatch.select(CPU, torch.float32) == "reference"  # an op without a compiled loop
    assert dispatch.select(CUDA, torch.float32, compiled=built) == "triton"
    with dispatch.use_backend("reference"):
        assert dispatch.select(CPU, torch.float32, compiled=lambda: pytest.fail("built for nothing")) == "reference"
    with dispatch.use_backend("compiled"):
        assert dispatch.select(CPU, torch.float32, compiled=built) == "compiled"
        assert dispatch.select(CPU, torch.float32) == "reference"
        with pytest.raises(RuntimeError, match="'compiled' kernel backend is forced but the compiled loop cannot"):
            dispatch.select(CPU, torch.float32, compiled=broken)


def test_setter_and_context_manager_override_the_env_and_restore(monkeypatch):
    monkeypatch.setattr(dispatch, "triton_available", lambda: True)
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    kernels.set_backend("reference")
    assert kernels.get_backend() == "reference"
    with kernels.use_backend("auto"):
        assert dispatch.select(CUDA, torch.float32) == "triton"
        with kernels.use_backend("reference"):
            assert dispatch.select(CUDA, torch.float32) == "reference"
        assert kernels.get_backend() == "auto"
    assert kernels.get_backend() == "reference"
    with pytest.raises(RuntimeError), kernels.use_backend("auto"):
        raise RuntimeError("the previous choice survives an exception")
    assert kernels.get_backend() == "reference"
    kernels.set_backend(None)
    assert kernels.get_backend() == "triton"
    with pytest.raises(ValueError, match="set_backend"):
        kernels.set_backend("fast")


def test_forcing_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setattr(dispatch, "triton_available", lambda: True)
    with kernels.use_backend("triton"):
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            dispatch.select(CPU, torch.float32)
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            kernels.lora_linear(*_args())
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        with pytest.raises(RuntimeError, match="float64"):
            dispatch.select(CPU, torch.float64)


def test_forcing_triton_without_triton_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(dispatch, "triton_available", lambda: False)
    with kernels.use_backend("triton"), pytest.raises(RuntimeError, match="Triton cannot be imported"):
        dispatch.select(CUDA, torch.float32)


def test_auto_on_cpu_runs_the_reference_without_loading_triton_kernels():
    x, weight, bias, a, b, scaling, n_blocks = _args()
    x.requires_grad_()
    kernels.lora_linear(x, weight, bias, a, b, scaling, n_blocks, dropout_p=0.5).sum().backward()
    assert x.grad is not None
    assert "blocktrain.kernels._lora_linear_triton" not in sys.modules


def test_poisoned_outputs_fill_new_buffers_and_restore():
    with dispatch.poisoned_outputs():
        assert dispatch.empty((3, 2), torch.bfloat16, CPU).isnan().all()
        assert (dispatch.empty((4,), torch.uint8, CPU) == 255).all()
    assert dispatch.empty((2,), torch.float32, CPU).shape == (2,)
    assert not dispatch._poison


def test_the_path_an_op_runs_is_logged_once_per_process(monkeypatch, caplog):
    monkeypatch.setattr(dispatch, "_announced", set())
    with caplog.at_level("INFO", logger="blocktrain.kernels.dispatch"):
        for _ in range(3):
            kernels.lora_linear(*_args())
        dispatch.announce("lora_linear", "triton")  # another path is news again, once
        dispatch.announce("lora_linear", "triton")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["kernel lora_linear runs the PyTorch reference (requested backend: auto)",
                        "kernel lora_linear runs the Triton kernel (requested backend: auto)"]
    assert all(r.levelname == "INFO" for r in caplog.records)
