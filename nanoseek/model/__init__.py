from nanoseek.model.block import Block
from nanoseek.model.transformer import LossOutput, Transformer, build_model, from_pretrained

__all__ = ["Block", "LossOutput", "Transformer", "build_model", "from_pretrained"]
