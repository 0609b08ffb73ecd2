"""bv_blend: a readable GRPO trainer built around the BV-Blend advantage op (bv_blend_ext).

`GRPOConfig` and `GRPOTrainer` are imported on first use, so that light modules such as
`bv_blend.tiny_model` can be imported without loading the trainer and the compiled op.
"""

__all__ = ["GRPOConfig", "GRPOTrainer"]


def __getattr__(name):
    if name == "GRPOConfig":
        from bv_blend.config import GRPOConfig
        return GRPOConfig
    if name == "GRPOTrainer":
        from bv_blend.trainer import GRPOTrainer
        return GRPOTrainer
    raise AttributeError(f"module 'bv_blend' has no attribute {name!r}")
