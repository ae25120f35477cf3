"""Small, seeded test models: plain torch modules (MLP, CNN) and tiny transformers models
(GPT-2, LLaMA with GQA + RoPE + SwiGLU + RMSNorm, BERT).

Every builder seeds torch, so the same name always gives the same weights. Parameters are
perturbed after transformers' init so norms and biases are not the trivial 1/0 that would hide
swapped-operand bugs.
"""

from __future__ import annotations

import torch
from torch import nn

SEED = 0


class MLP(nn.Module):
    """Token-wise MLP on x: [T, 16] -> [T, 8]."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 8)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(nn.functional.gelu(self.fc1(x)))))


class CNN(nn.Module):
    """x: [N, 3, 16, 16] -> logits [N, 10]: conv-bn-relu-maxpool, conv-relu-avgpool, adaptive pool, linear."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = nn.functional.max_pool2d(torch.relu(self.bn1(self.conv1(x))), 2)
        x = nn.functional.avg_pool2d(torch.relu(self.conv2(x)), 2)
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
        return self.fc(x)


def build_mlp():
    torch.manual_seed(SEED)
    return MLP().eval(), (torch.randn(6, 16),), {"x": {0: "T"}}


def build_cnn():
    torch.manual_seed(SEED)
    model = CNN()
    with torch.no_grad():  # non-trivial running statistics, as after training
        model.bn1.running_mean.uniform_(-0.5, 0.5)
        model.bn1.running_var.uniform_(0.5, 2.0)
        model.bn1.weight.uniform_(0.5, 1.5)
        model.bn1.bias.uniform_(-0.2, 0.2)
    return model.eval(), (torch.randn(2, 3, 16, 16),), {"x": {0: "N"}}


def _perturb(model):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def build_tiny_gpt():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(SEED)
    config = GPT2Config(vocab_size=256, n_positions=64, n_embd=64, n_layer=2, n_head=4, use_cache=False,
                        attn_implementation="sdpa")
    return _perturb(GPT2LMHeadModel(config))


def build_tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(SEED)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False, use_cache=False,
                         attn_implementation="sdpa")
    return _perturb(LlamaForCausalLM(config))


def build_tiny_bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(SEED)
    config = BertConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=96, max_position_embeddings=64, type_vocab_size=2,
                        attn_implementation="sdpa")
    return _perturb(BertModel(config, add_pooling_layer=False))


TORCH_MODELS = {"mlp": build_mlp, "cnn": build_cnn}
TINY_HF_MODELS = {"tiny-gpt": build_tiny_gpt, "tiny-llama": build_tiny_llama, "tiny-bert": build_tiny_bert}


def save_tiny_hf(name: str, folder) -> None:
    """Write a tiny transformers model as a Hugging Face folder (config.json + model.safetensors)."""
    model = TINY_HF_MODELS[name]()
    model.config.architectures = [type(model).__name__]
    model.save_pretrained(folder, safe_serialization=True)
