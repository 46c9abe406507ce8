"""The course's device and thread choice, and the measured paths run with the device forced.

Chapters 01, 03 and 08 measure on ``environment.measurement_device()`` (CUDA where present). A
machine without a GPU can still catch a tensor left on the wrong device: (1) with torch's default
device set to ``meta`` and the inputs on the CPU, any tensor a method creates without following
its inputs' device lands on ``meta`` and mixing it with the inputs fails; (2) on ``meta`` as the
forced device, the softmax-family methods (no data-dependent checks) must return ``meta`` tensors.
"""

import os

import pytest
import torch

from course_lib import environment
from course_lib.benchmarks import ch08 as bench08
from course_lib.benchmarks.ch01 import standard_suite
from course_lib.benchmarks.ch03 import flash_suite


def _suites(device):
    """Every method measured in chapters 01, 03 and 08 (the three phases), built for ``device``."""
    methods = {}
    for suite in (standard_suite, flash_suite):
        built, _, _ = suite(device)
        methods.update({f"{suite.__name__}:{name}": build for name, build in built.items()})
    for phase in bench08.PHASES:
        methods.update(bench08.phase_methods(phase, device))
    return methods


def _tensors(output):
    outputs = output if isinstance(output, (tuple, list)) else [output]
    return [o for o in outputs if isinstance(o, torch.Tensor)]


@pytest.fixture
def default_device_meta():
    """Inside the block, a tensor created without ``device=`` lands on ``meta``."""
    torch.set_default_device("meta")
    try:
        yield
    finally:
        torch.set_default_device(None)


@pytest.fixture
def on_default_device_meta():
    """``on_default_device_meta(fn)`` calls ``fn`` with torch's default device set to ``meta``."""

    def call(fn):
        torch.set_default_device("meta")
        try:
            return fn()
        finally:
            torch.set_default_device(None)

    return call


def test_the_harness_catches_a_tensor_created_on_the_default_device(default_device_meta):
    x = torch.ones(3, device="cpu")
    with pytest.raises(RuntimeError, match="device"):
        torch.arange(3) + x  # the bug the next test looks for: no device= on a new tensor
    assert (torch.arange(3, device=x.device) + x).device.type == "cpu"


@pytest.mark.parametrize("name", sorted(_suites("cpu")))
def test_measured_paths_create_no_tensor_off_their_inputs_device(name, on_default_device_meta):
    call = _suites("cpu")[name](64)  # inputs: made on the CPU, then moved to the suite's device
    outputs = _tensors(on_default_device_meta(call))
    assert outputs and all(o.device.type == "cpu" for o in outputs)


def test_measured_inputs_are_made_on_the_requested_device():
    # The suites build their inputs with these, on the device they are given (meta: no data, no
    # compute; the kernels themselves refuse meta tensors, so the paths run with default device meta
    # above instead).
    from course_lib import catalogue
    from course_lib.measure import random_qkv

    assert {t.device.type for t in random_qkv(8, device="meta")} == {"meta"}
    for mechanism in catalogue.mechanisms(has="run"):
        inputs = mechanism.make_inputs(8, device="meta")
        assert {t.device.type for t in inputs.values()} == {"meta"}, mechanism.name


# --- pick_device and measurement_device ---------------------------------------------------------


def test_course_device_forces_the_device(monkeypatch):
    monkeypatch.setenv("COURSE_DEVICE", "meta")
    assert environment.pick_device() == torch.device("meta")
    assert environment.measurement_device() == torch.device("meta")
    monkeypatch.setenv("COURSE_DEVICE", "cpu")
    assert environment.pick_device() == torch.device("cpu")


def test_course_device_errors_name_the_variable(monkeypatch):
    monkeypatch.setenv("COURSE_DEVICE", "gpu0")
    with pytest.raises(ValueError, match="COURSE_DEVICE"):
        environment.pick_device()
    if not torch.cuda.is_available():
        monkeypatch.setenv("COURSE_DEVICE", "cuda")
        with pytest.raises(ValueError, match="COURSE_DEVICE.*no CUDA"):
            environment.pick_device()


def test_without_course_device_cuda_then_mps_then_cpu(monkeypatch):
    monkeypatch.delenv("COURSE_DEVICE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert environment.pick_device().type == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert environment.pick_device().type == "mps"
    assert environment.measurement_device().type == "cpu"  # bench cannot wait for MPS kernels
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert environment.pick_device().type == "cpu"


# --- threads ---------------------------------------------------------------------------------


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def no_thread_variables(monkeypatch):
    for name in ("COURSE_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)


def test_few_cores_get_one_thread(monkeypatch, restore_threads, no_thread_variables):
    torch.set_num_threads(2)
    monkeypatch.setattr(environment, "usable_cores", lambda: 2)
    assert environment.choose_threads() == 1 == torch.get_num_threads()
    assert environment.thread_choice().startswith("1 (the course's choice for 2 cores")
    assert "COURSE_THREADS" in environment.environment_report()["torch threads"]


def test_many_cores_keep_torch_default(monkeypatch, restore_threads, no_thread_variables):
    torch.set_num_threads(3)
    monkeypatch.setattr(environment, "usable_cores", lambda: 16)
    assert environment.choose_threads() == 3
    assert environment.thread_choice() == "3 (torch's default)"


def test_thread_variables_win(monkeypatch, restore_threads, no_thread_variables):
    monkeypatch.setattr(environment, "usable_cores", lambda: 2)
    monkeypatch.setenv("COURSE_THREADS", "2")
    assert environment.choose_threads() == 2
    assert environment.thread_choice() == "2 (COURSE_THREADS=2)"
    monkeypatch.delenv("COURSE_THREADS")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    torch.set_num_threads(2)
    assert environment.choose_threads() == 2  # torch already follows OMP_NUM_THREADS
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv("COURSE_THREADS", bad)
        with pytest.raises(ValueError, match="COURSE_THREADS"):
            environment.choose_threads()


def test_usable_cores_is_positive():
    assert 1 <= environment.usable_cores() <= (os.cpu_count() or 1)
