import os

import pytest
import torch

from workers.model_loader import random_runner
from workers.model_spec import ModelSpec

TINY = ModelSpec(vocab_size=257, hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2,
                 head_dim=16, intermediate_size=128, max_position=512, eos_token_ids=(1,))


@pytest.fixture(scope="session")
def smollm2():
    from workers.model_loader import load_runner, load_tokenizer
    torch.manual_seed(0)
    try:
        return load_runner("smollm2-135m"), load_tokenizer("smollm2-135m")
    except FileNotFoundError as e:
        if os.environ.get("CI"):
            raise  # CI installs the weights: missing there is a failure
        pytest.skip(f"{e} (a lent GPU machine has no weights)")


@pytest.fixture()
def tiny_runner():
    return random_runner(TINY, "cpu", torch.float32, seed=1, std=0.2)
