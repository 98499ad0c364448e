"""Small Hugging Face models (random weights, tiny configs) for the torch.export front-end's tests."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class HFCase:
    name: str
    cls: str  # transformers class (its config class is cls.config_class)
    config: dict
    inputs: tuple[str, ...]  # --input specs
    sites: int  # expected residual sites
    task: str  # "tokens" | "image": what the toy training task feeds
    drop_path: bool = False  # the architecture carries its own drop-path modules


LAYERS = 2
TEXT = dict(vocab_size=97, max_position_embeddings=64)

HF_ZOO = [
    HFCase("bert", "BertForSequenceClassification",
           dict(TEXT, hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=2, intermediate_size=64,
                num_labels=3),
           ("input_ids:2,12:int64",), 2 * LAYERS, "tokens"),
    HFCase("gpt2", "GPT2LMHeadModel",
           dict(vocab_size=97, n_positions=64, n_embd=32, n_layer=LAYERS, n_head=2),
           ("input_ids:2,12:int64",), 2 * LAYERS, "tokens"),
    HFCase("llama", "LlamaForCausalLM",
           dict(TEXT, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=2,
                num_key_value_heads=1),
           ("input_ids:2,12:int64",), 2 * LAYERS, "tokens"),
    # Mixture of experts (transformers' default experts implementation, one fused grouped matmul): each layer
    # adds its attention and its sparse-MoE block
    HFCase("mixtral", "MixtralForCausalLM",
           dict(TEXT, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=2,
                num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2),
           ("input_ids:2,12:int64",), 2 * LAYERS, "tokens"),
    # parallel residual: x + attn(ln1(x)) + mlp(ln2(x)), one block per layer whose body is both paths
    HFCase("gpt_neox", "GPTNeoXForCausalLM",
           dict(TEXT, hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=2, intermediate_size=64,
                use_parallel_residual=True),
           ("input_ids:2,12:int64",), LAYERS, "tokens"),
    HFCase("bert_mlm", "BertForMaskedLM",
           dict(TEXT, hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=2, intermediate_size=64),
           ("input_ids:2,12:int64",), 2 * LAYERS, "tokens"),
    # encoder-decoder for generation: each encoder layer adds self-attention and feed-forward, each decoder layer
    # self-attention, cross-attention and feed-forward
    HFCase("bart", "BartForConditionalGeneration",
           dict(TEXT, d_model=32, encoder_layers=LAYERS, decoder_layers=LAYERS, encoder_attention_heads=2,
                decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64),
           ("input_ids:2,12:int64", "decoder_input_ids:2,12:int64"), (2 + 3) * LAYERS, "tokens"),
    # the same shape, its stacks each reading a config copy of their own (use_cache off in every one to capture)
    HFCase("t5", "T5ForConditionalGeneration",
           dict(vocab_size=97, d_model=32, d_kv=16, d_ff=64, num_layers=LAYERS, num_decoder_layers=LAYERS,
                num_heads=2, decoder_start_token_id=0),
           ("input_ids:2,12:int64", "decoder_input_ids:2,12:int64"), (2 + 3) * LAYERS, "tokens"),
    HFCase("vit", "ViTForImageClassification",
           dict(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=LAYERS,
                num_attention_heads=2, intermediate_size=64, num_labels=3),
           ("pixel_values:2,3,16,16",), 2 * LAYERS, "image"),
    HFCase("resnet", "ResNetForImageClassification",
           dict(embedding_size=8, hidden_sizes=[8, 16], depths=[2, 1], layer_type="basic", num_labels=3),
           ("pixel_values:2,3,32,32",), 3, "image"),
    HFCase("convnext", "ConvNextForImageClassification",
           dict(num_channels=3, num_stages=2, hidden_sizes=[8, 16], depths=[2, 1], num_labels=3, drop_path_rate=0.1),
           ("pixel_values:2,3,32,32",), 3, "image", drop_path=True),
    HFCase("swin", "SwinForImageClassification",
           dict(image_size=32, patch_size=4, num_channels=3, embed_dim=16, depths=[2, 1], num_heads=[2, 2],
                window_size=4, num_labels=3, drop_path_rate=0.1),
           ("pixel_values:2,3,32,32",), 2 * 3, "image", drop_path=True),
]
CASES = {c.name: c for c in HF_ZOO}


def build(case: HFCase, seed: int = 0):
    """A fresh model of ``case`` with random weights (nothing is downloaded)."""
    import transformers

    cls = getattr(transformers, case.cls)
    torch.manual_seed(seed)
    config = cls.config_class(**case.config)
    return cls(config)


def save(case: HFCase, folder, seed: int = 0):
    """``save_pretrained`` a fresh model into ``folder`` (config.json + model.safetensors); returns the model."""
    model = build(case, seed)
    model.save_pretrained(folder)
    return model
