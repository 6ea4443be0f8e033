"""Shared test set-up: never touch a network, deterministic seeds."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread while a module runs (restored after): on a small busy CPU, torch's OpenMP pool
    competing with a server's HTTP threads can stall seconds per batch (see ServeSettings.torch_threads)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory):
    """tests/tiny_models.py's "llava" checkpoint (4x4 patch grid of 32 px views), built once per session.
    Read-only: a test that writes a checkpoint builds its own."""
    from tests.tiny_models import build

    return build("llava", tmp_path_factory.mktemp("tiny-llava"))
