"""nanoseek: the DeepSeek recipe (MLA, DeepSeekMoE, MTP, FP8, GRPO, distillation) as one readable codebase."""

from nanoseek.config import ModelConfig, preset, presets

__version__ = "0.1.0"

__all__ = ["ModelConfig", "preset", "presets", "load_model", "save_model", "Engine", "__version__"]


def __getattr__(name: str):
    # Heavy modules load on first use so `import nanoseek` and `nanoseek --help` stay fast.
    if name in ("load_model", "save_model"):
        from nanoseek import checkpoint

        return getattr(checkpoint, name)
    if name == "Engine":
        from nanoseek.infer.engine import Engine

        return Engine
    if name == "DeepseekV3ForCausalLM":
        from nanoseek.model.transformer import DeepseekV3ForCausalLM

        return DeepseekV3ForCausalLM
    raise AttributeError(f"module 'nanoseek' has no attribute {name!r}")
