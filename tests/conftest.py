from __future__ import annotations

import os

import pytest
import torch

# Without a GPU the Triton kernels run under Triton's interpreter, which must be switched on before anything
# imports them (several test modules reach jrt.ops.triton indirectly); on a GPU machine they compile.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from jrt.paths import data_dir


@pytest.fixture
def shared_data():
    """The offline data folder; tests that need it skip cleanly when it is absent."""
    path = data_dir()
    if not path.is_dir():
        pytest.skip(f"offline data folder not found: {path} (set JRT_DATA_DIR)")
    return path


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Test tensors are small: one torch thread is faster than several (more so on a busy machine), and
    results do not depend on it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def tok():
    """The offline GPT-2 tokenizer (skips when the data folder is absent)."""
    from recall_fixtures import gpt2_tokenizer

    t = gpt2_tokenizer()
    if t is None:
        pytest.skip("offline GPT-2 tokenizer not found (set JRT_DATA_DIR)")
    return t
