import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # 2-core CI: more threads make tiny models 20-50x slower

import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
