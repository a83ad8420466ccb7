"""nanoseek: DeepSeek-V3/R1 as one small, hackable PyTorch codebase."""

import os

# Back PyTorch's large CPU tensors with transparent huge pages (read once, when torch allocates first): the MoE's
# ~100 MB gather/scatter temporaries otherwise spend a third of their time in page faults. Set it to 0 to opt out.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from nanoseek.config import ModelArgs, get_preset
from nanoseek.errors import NanoseekError
from nanoseek.model import Transformer, build_model

__version__ = "0.1.0"


def from_pretrained(path, device=None, dtype=None) -> Transformer:
    """Load a DeepseekV3ForCausalLM-format checkpoint directory (nanoseek's, transformers', DeepSeek's, V2, FP8)."""
    from nanoseek.checkpoint import from_pretrained as _load
    return _load(path, device=device, dtype=dtype)


__all__ = ["ModelArgs", "NanoseekError", "Transformer", "build_model", "from_pretrained", "get_preset"]
