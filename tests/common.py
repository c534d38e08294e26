"""Constants shared by the test modules: the device under test, the divergences, the TOPD configuration,
and the backends that can run here (the registry decides; on a machine without CUDA the Triton kernels run
in the interpreter and the CUDA extension in its host build)."""
import torch

from topd_kernels import Quantile
from topd_kernels.config import DIVERGENCES
from topd_kernels.rows import registry

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BETA = 0.3
TOPD = dict(window=3, gamma=0.5, loss_threshold=Quantile(0.4), div_threshold=Quantile(0.5),
            suppress_weight=0.25, guidance_weight=0.8)
# Every registered backend, each test case run against it; one that cannot run here fails the test
# (it is not skipped): "triton" and "triton+cuda" run on this machine's CPU too.
BACKENDS = tuple(registry.BACKENDS)

__all__ = ["DEVICE", "BETA", "TOPD", "BACKENDS", "DIVERGENCES"]
