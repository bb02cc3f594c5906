import os

import pytest
import torch

# Two cores: keep every test single-threaded so parallel helpers and CI stay predictable.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")

TINY = [
    "data.name=digits",
    "data.limit=200",
    "model.arch=SiT-T/8",
    "train.batch_size=16",
    "train.threads=1",
    "train.progress=false",
    "train.tensorboard=false",
    "train.sample_grid=10",
    "sampler.steps=2",
    "optim.lr=1e-3",
]


@pytest.fixture
def tiny_overrides():
    return list(TINY)


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch, request):
    """Every test runs from the repository root: configs/ and cache/ paths are relative to it."""
    monkeypatch.chdir(request.config.rootpath)


@pytest.fixture(scope="module")
def base(request):
    """(data, model, REPA objective, batch) of test_repa.setup, shared by a module's VRPO tests."""
    from test_repa import setup  # here: at the top, its EfficientNet importorskip would skip every test

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(request.config.rootpath)
        _, data, model, repa, batch = setup()
    return data, model, repa, batch


# The longest files first (measured: --durations): `-n auto --dist loadfile` hands files out in
# collection order, so the long ones start at once and the short ones fill in beside them.
LONGEST_FIRST = ("test_study.py", "test_distributed.py", "test_train.py", "test_objective_contract.py")


def pytest_collection_modifyitems(items):
    def rank(item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: the order within a file stays
