"""kedit's own model adapters, registered through the same hook a third-party plugin would use."""
from __future__ import annotations

from ..plugins.hookspecs import hookimpl
from .base import ModelAdapter


def _llama_like(name: str, *config_classes: str, notes: str = "", post_mlp_norm: str | None = None) -> ModelAdapter:
    return ModelAdapter(
        name=name, config_classes=config_classes, layers="model.layers", mlp="model.layers.{}.mlp",
        mlp_out="model.layers.{}.mlp.down_proj", attn="model.layers.{}.self_attn", final_norm="model.norm",
        unembedding="lm_head", embedding="model.embed_tokens", mlp_out_layout="out_in", notes=notes,
        post_mlp_norm=post_mlp_norm)


# Gemma 2 and 3 normalise the MLP's output (RMSNorm with a (1 + w) gain) before adding it to the
# residual stream; their embeddings are scaled by sqrt(d) inside the embedding module, the head is tied
# to it, and their layers alternate sliding-window and global attention (all inside the blocks, so
# nothing editing reads depends on it beyond the blocks' own forward).
_GEMMA_POST_MLP = "model.layers.{}.post_feedforward_layernorm"


BUILTIN_ADAPTERS: tuple[ModelAdapter, ...] = (
    ModelAdapter(
        name="gpt2", config_classes=("GPT2Config",), layers="transformer.h", mlp="transformer.h.{}.mlp",
        mlp_out="transformer.h.{}.mlp.c_proj", attn="transformer.h.{}.attn", final_norm="transformer.ln_f",
        unembedding="lm_head", embedding="transformer.wte", mlp_out_layout="in_out",
        context_length_keys=("n_positions", "n_ctx"), notes="Conv1D weights are stored in x out"),
    ModelAdapter(
        name="gpt-neo", config_classes=("GPTNeoConfig",), layers="transformer.h", mlp="transformer.h.{}.mlp",
        mlp_out="transformer.h.{}.mlp.c_proj", attn="transformer.h.{}.attn", final_norm="transformer.ln_f",
        unembedding="lm_head", embedding="transformer.wte", mlp_out_layout="out_in"),
    ModelAdapter(
        name="gptj", config_classes=("GPTJConfig",), layers="transformer.h", mlp="transformer.h.{}.mlp",
        mlp_out="transformer.h.{}.mlp.fc_out", attn="transformer.h.{}.attn", final_norm="transformer.ln_f",
        unembedding="lm_head", embedding="transformer.wte", mlp_out_layout="out_in",
        context_length_keys=("n_positions", "max_position_embeddings")),
    ModelAdapter(
        name="gpt-neox", config_classes=("GPTNeoXConfig",), layers="gpt_neox.layers",
        mlp="gpt_neox.layers.{}.mlp", mlp_out="gpt_neox.layers.{}.mlp.dense_4h_to_h",
        attn="gpt_neox.layers.{}.attention", final_norm="gpt_neox.final_layer_norm", unembedding="lm_head|embed_out",
        embedding="gpt_neox.embed_in", mlp_out_layout="out_in"),
    _llama_like("llama", "LlamaConfig"),
    _llama_like("mistral", "MistralConfig"),
    _llama_like("qwen2", "Qwen2Config"),
    _llama_like("qwen3", "Qwen3Config"),
    _llama_like("gemma", "GemmaConfig"),
    _llama_like("gemma2", "Gemma2Config", post_mlp_norm=_GEMMA_POST_MLP,
                notes="post-MLP RMSNorm; final logits soft-capped"),
    _llama_like("gemma3", "Gemma3TextConfig", post_mlp_norm=_GEMMA_POST_MLP,
                notes="post-MLP RMSNorm; scaled embeddings, tied head; sliding/global attention layers"),
    _llama_like("phi3", "Phi3Config", notes="gate and up projections are fused (gate_up_proj)"),
    _llama_like("olmo2", "Olmo2Config"),
)


@hookimpl
def register_model_adapters(register):
    for adapter in BUILTIN_ADAPTERS:
        register(adapter)
