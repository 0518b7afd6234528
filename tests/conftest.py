import pytest
import torch

from nuwaxl.runtime.pipeline import Pipeline


@pytest.fixture(scope="session")
def tiny_pipe() -> Pipeline:
    torch.set_num_threads(2)
    return Pipeline.from_preset("tiny", seed=0, device="cpu")
