from nanoseek.model.transformer import Block, LossOutput, Transformer, build_model

__all__ = ["Block", "LossOutput", "Transformer", "build_model"]
