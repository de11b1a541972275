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
    # Val loss about 1.73 in 75-165 s on a 2-core CPU (see the README's results).
    "cpu": dict(max_iters=600, eval_interval=200, eval_iters=20, batch_size=64, block_size=64,
                n_layer=4, n_head=4, n_embd=128, dropout=0.0, learning_rate=2e-3, min_lr=2e-4,
                warmup_iters=100, beta2=0.99, weight_decay=0.1),
}

FAMILY = ModelFamily(kind="bigram", tokenizer="char", model_cls=BigramLanguageModel,
                     config_cls=BigramConfig, recipe=RECIPE, presets=PRESETS)
