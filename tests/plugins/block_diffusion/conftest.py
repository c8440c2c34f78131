import pytest
import torch


def tiny_llama(vocab: int = 40, seed: int = 0, attn: str = "block_diffusion"):
    """A 2-layer LlamaForCausalLM with grouped-query attention, switched to the block-diffusion attention op."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from blocktrain.kernels.block_diffusion_attention import register_hf_attention

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = LlamaForCausalLM(cfg).eval()
    if attn == "block_diffusion":
        register_hf_attention()
    model.set_attn_implementation(attn)
    return model


@pytest.fixture
def llama():
    return tiny_llama()
