import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # 2-core CI: more threads make tiny models 20-50x slower

import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_ckpts(tmp_path_factory):
    """Random-weight tiny checkpoints (t2v/, i2v/, vae/, t5/) written once per test session."""
    sys.path.insert(0, str(REPO / "scripts"))
    import make_tiny_checkpoints
    out = tmp_path_factory.mktemp("tiny")
    make_tiny_checkpoints.main(["--out", str(out)])
    return out
