import os

import pytest
import torch

torch.set_num_threads(int(os.environ.get("PUZZLE_TEST_THREADS", "2")))


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run the full-size slow end-to-end tests")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        skip_gpu = None
    else:
        skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_slow = None if config.getoption("--runslow") else pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "gpu" in item.keywords and skip_gpu:
            item.add_marker(skip_gpu)
        if "slow" in item.keywords and skip_slow:
            item.add_marker(skip_slow)


_MCORE_STARTED = False


@pytest.fixture(scope="session")
def mcore():
    """Megatron-Core initialised in this process as a world of one (TP 1)."""
    global _MCORE_STARTED
    from megatron_puzzle.model.parallel import init_distributed

    init_distributed(tensor_parallel=1)
    _MCORE_STARTED = True
    return True


@pytest.fixture(autouse=True)
def _mcore_restored():
    """A test that runs a command in this process (cli.main) may shut the process group down or leave
    another TP/PP layout behind; later tests rely on the session's world of one, so it is restored."""
    yield
    if _MCORE_STARTED:
        from megatron_puzzle.model.parallel import init_distributed

        init_distributed(tensor_parallel=1)
