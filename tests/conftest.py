import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The benchmark data: $ZOTUNE_DATA, else ../shared/data beside the repository."""
    path = Path(os.environ.get("ZOTUNE_DATA", REPO.parent / "shared" / "data"))
    if not path.is_dir():
        pytest.fail(f"benchmark data not found at {path}; set ZOTUNE_DATA")
    return path
