"""nanoseek: DeepSeek-V3/R1 as one small, hackable PyTorch codebase."""

import os

# Back PyTorch's large CPU tensors with transparent huge pages (read once, when torch allocates first): the MoE's
# ~100 MB gather/scatter temporaries otherwise spend a third of their time in page faults. Set it to 0 to opt out.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from nanoseek.config import ModelArgs, get_preset
from nanoseek.errors import NanoseekError
from nanoseek.model import Transformer, build_model, from_pretrained

__version__ = "0.1.0"


__all__ = ["ModelArgs", "NanoseekError", "Transformer", "build_model", "from_pretrained", "get_preset"]
