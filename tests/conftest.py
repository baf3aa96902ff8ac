import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _torch_threads_restored():
    """Put torch's thread count back after each test: a forward's round-off depends on it, so a
    test that sets it would change the bitwise references of the tests after it."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The benchmark data: $ZOTUNE_DATA, else ../shared/data beside the repository."""
    path = Path(os.environ.get("ZOTUNE_DATA", REPO.parent / "shared" / "data"))
    if not path.is_dir():
        pytest.fail(f"benchmark data not found at {path}; set ZOTUNE_DATA")
    return path


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A random 2-layer Llama and its tokenizer saved as a local model directory."""
    from zotune.models import tiny_model

    path = tmp_path_factory.mktemp("tiny-llama")
    model, tokenizer = tiny_model("llama", seed=0)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
