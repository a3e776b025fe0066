import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

# Two cores: oversubscribed threads made steps up to 100x slower on this machine.
torch.set_num_threads(int(os.environ.get("MGIQA_TEST_THREADS", "2")))
