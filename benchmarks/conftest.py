import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

# Without a GPU, Triton kernels run in the interpreter (bench_attention's CPU smoke run); like
# tests/conftest.py, this must be set before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

RATIOS: list[str] = []


def pytest_terminal_summary(terminalreporter):
    """Print the side-by-side ratios the benchmark modules recorded (same run, same machine)."""
    if RATIOS:
        terminalreporter.write_sep("=", "ratios (measured side by side in this run)")
        for line in RATIOS:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def ratios():
    return RATIOS
