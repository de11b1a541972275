"""The char model family: its tokenizer, its seed recipe and its presets.

The architecture's seed values are BigramConfig's defaults (bigram/model.py); the training
values are RECIPE below. Every flag of bigram/train.py starts from these.
"""
from bigram.model import BigramConfig, BigramLanguageModel
from lmkit.family import ModelFamily

RECIPE = dict(max_iters=5000, eval_interval=500, eval_iters=200, batch_size=64,
              grad_accum_steps=1, learning_rate=3e-4, min_lr=3e-5, warmup_iters=100,
              weight_decay=0.01, beta2=0.999)

PRESETS = {
    # The laptop speedrun (docs/speedrun.md): tuned on a 2-core AVX2 CPU to fit the
    # wall time of nanoGPT's CPU char recipe there. Two layers take more, cheaper steps than
    # four in that time; rotary positions, QK-norm, Muon, and a 40x AdamW rate for the
    # embedding table; 2,048 tokens per step.
    "cpu": dict(max_iters=1100, eval_interval=275, eval_iters=10, batch_size=32, block_size=64,
                n_layer=2, n_head=4, n_embd=128, dropout=0.0, rotary=True, qk_norm=True,
                optimizer="muon", learning_rate=2e-3, min_lr=2e-5, warmup_iters=30, beta2=0.99,
                weight_decay=0.0, embedding_lr=8e-2),
}

FAMILY = ModelFamily(kind="bigram", tokenizers=("char",), default_data="char",
                     model_cls=BigramLanguageModel, config_cls=BigramConfig, recipe=RECIPE,
                     presets=PRESETS)
