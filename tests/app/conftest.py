import pytest
import torch


@pytest.fixture(autouse=True)
def restore_threads():
    # Trainer configs and benchmarks set the thread count, which is process-wide: give every
    # other test its own back.
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
