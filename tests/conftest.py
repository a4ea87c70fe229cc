"""Test setup: run the real Triton kernels on the CPU through the interpreter when there is no GPU.

TRITON_INTERPRET must be set before any kernel module is imported (triton.jit reads it when decorating), so it is
set here, at collection time. On a machine with CUDA the kernels are compiled and the tests run on the GPU.
"""

import os
import pathlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_GPU = DEVICE == "cuda"
SHARED = pathlib.Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="session")
def token_corpus(tmp_path_factory) -> pathlib.Path:
    """A directory with train.bin / val.bin of learnable synthetic GPT-2 ids (see helpers.write_synthetic_corpus)."""
    from helpers import write_synthetic_corpus

    return write_synthetic_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def gpt2_encoding():
    """tiktoken's GPT-2 BPE, or a skip saying what is missing. Never touches the network: the encoding must be in
    tiktoken's cache (TIKTOKEN_CACHE_DIR, or tiktoken's default cache after one online use)."""
    import hashlib
    import tempfile

    import tiktoken

    # tiktoken caches a download under sha1(url) in TIKTOKEN_CACHE_DIR (or DATA_GYM_CACHE_DIR, or a temp folder).
    url = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"
    cache_dir = (
        os.environ.get("TIKTOKEN_CACHE_DIR")
        or os.environ.get("DATA_GYM_CACHE_DIR")
        or os.path.join(tempfile.gettempdir(), "data-gym-cache")
    )
    if not os.path.isfile(os.path.join(cache_dir, hashlib.sha1(url.encode()).hexdigest())):
        pytest.skip(
            "GPT-2's BPE (tiktoken r50k_base) is not cached on this machine and tests never download: run once "
            "with network, or set TIKTOKEN_CACHE_DIR to a folder holding it"
        )
    return tiktoken.get_encoding("r50k_base")


@pytest.fixture(scope="session")
def shakespeare_dir() -> pathlib.Path:
    """The Shakespeare corpus beside the project (../shared), or a skip: it is not shipped with the project."""
    path = SHARED / "corpora" / "shakespeare"
    if not path.is_dir():
        pytest.skip(f"the Shakespeare corpus is not here ({path}); it sits beside the project in CI only")
    return path


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
    seed = (
        int.from_bytes(os.urandom(4), "little")
        if os.environ.get("FASTCENTER_TEST_SEED") is None
        else int(os.environ["FASTCENTER_TEST_SEED"])
    )
    torch.manual_seed(seed)
    request.node.user_properties.append(("seed", seed))
    yield


def pytest_runtest_makereport(item, call):
    if call.when == "call" and call.excinfo is not None:
        for name, value in item.user_properties:
            if name == "seed":
                item.add_report_section("call", "seed", f"reproduce with FASTCENTER_TEST_SEED={value}")
