"""Put this folder first on PYTHONPATH to run any command with SDPA's cuDNN backend off (every process, torchrun's
workers included): the A/B of this question without a switch in the package."""
import sys

import torch

torch.backends.cuda.enable_cudnn_sdp(False)
print("sitecustomize: SDPA's cuDNN backend off", file=sys.stderr)
