"""Test-session setup. Triton's interpreter must be switched on before any module defining
@triton.jit kernels is imported, so the Triton backend runs on CPU tensors here."""
import os
import pathlib

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture
def shared_data() -> pathlib.Path:
    """../shared/data beside the checkout; tests that need it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA
