"""A tiny model that ships its own code, as Baichuan, InternLM and some Qwen and Yi releases do: its config.json
names these classes in auto_map, and transformers runs them only with trust_remote_code=True. Like Baichuan's,
its attention projects query, key and value with one fused linear layer, W_pack."""
import torch
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast


class PackConfig(PretrainedConfig):
    model_type = "packlm"

    def __init__(self, vocab_size=1000, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, **kwargs):
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.num_hidden_layers, self.num_attention_heads = num_hidden_layers, num_attention_heads
        super().__init__(**kwargs)


class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.heads = config.num_attention_heads
        self.W_pack = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=False)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, x, mask):
        b, n, d = x.shape
        q, k, v = self.W_pack(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, d))


class Layer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size)
        self.up_proj = nn.Linear(config.hidden_size, 2 * config.hidden_size, bias=False)
        self.down_proj = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=False)

    def forward(self, x, mask):
        x = x + self.self_attn(self.input_layernorm(x), mask)
        return x + self.down_proj(nn.functional.gelu(self.up_proj(self.post_attention_layernorm(x))))


class PackModel(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Layer(config) for _ in range(config.num_hidden_layers))
        self.norm = nn.LayerNorm(config.hidden_size)


class PackForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = PackConfig
    base_model_prefix = "model"
    _tied_weights_keys = {}

    def __init__(self, config):
        super().__init__(config)
        self.model = PackModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids=None, attention_mask=None, labels=None, past_key_values=None, use_cache=None, **kwargs):
        n = input_ids.shape[1]
        mask = torch.ones(n, n, dtype=torch.bool, device=input_ids.device).tril()
        if attention_mask is not None:
            mask = mask[None, None] & attention_mask[:, None, None, :].bool()
        x = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            x = layer(x, mask)
        return CausalLMOutputWithPast(logits=self.lm_head(self.model.norm(x)))

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        return {"input_ids": input_ids, "attention_mask": attention_mask}
