"""Test setup: run the real Triton kernels on the CPU through the interpreter when there is no GPU.

TRITON_INTERPRET must be set before any kernel module is imported (triton.jit reads it when decorating), so it is
set here, at collection time. On a machine with CUDA the kernels are compiled and the tests run on the GPU.
"""

import os
import pathlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

_TIKTOKEN_CACHE = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "tiktoken_cache"
if _TIKTOKEN_CACHE.is_dir():
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(_TIKTOKEN_CACHE))

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = DEVICE == "cuda"
SHARED = pathlib.Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture
def device() -> str:
    return DEVICE


@pytest.fixture
def one_thread():
    """Tiny matmuls: one thread is as fast, and immune to other processes competing for the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """Fresh random data in every run, but reproducible from the seed printed on failure."""
    seed = int.from_bytes(os.urandom(4), "little") if os.environ.get("FASTCENTER_TEST_SEED") is None else int(
        os.environ["FASTCENTER_TEST_SEED"]
    )
    torch.manual_seed(seed)
    request.node.user_properties.append(("seed", seed))
    yield


def pytest_runtest_makereport(item, call):
    if call.when == "call" and call.excinfo is not None:
        for name, value in item.user_properties:
            if name == "seed":
                item.add_report_section("call", "seed", f"reproduce with FASTCENTER_TEST_SEED={value}")
