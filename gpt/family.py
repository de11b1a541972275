"""The GPT family: its tokens, its seed recipe and its presets.

The GPT reads a byte-level BPE trained on the user's own text (data/bpe1024/, written by
prepare_data.py) unless --data-dir names another folder: data/gpt2/ holds GPT-2's tokens, which
the seed recipe was written for and --init-from's GPT-2 weights need. The architecture's seed
values are GPTConfig's defaults (gpt/model.py); the training values are RECIPE below. Every flag
of gpt/train.py starts from these.
"""
from gpt.model import GPT, GPTConfig
from gpt.pretrained import load_gpt2
from lmkit.data import DEFAULT_BPE_VOCAB, data_folder_name
from lmkit.family import ModelFamily

# 4096 tokens per step: micro-batch 8 x block 64 x 8 accumulation steps.
RECIPE = dict(max_iters=4000, eval_interval=250, eval_iters=50, batch_size=8,
              grad_accum_steps=8, learning_rate=6e-4, min_lr=6e-5,
              warmup_iters=-1,  # a quarter of max_iters
              weight_decay=0.1, beta2=0.95)

PRESETS = {
    # The laptop speedrun (docs/speedrun.md): the GPT on its own 1,024-token BPE, tuned on a
    # 2-core CPU to beat nanoGPT's A100 Shakespeare loss in bits per character within the wall
    # time of nanoGPT's CPU char recipe. Two layers, 2,048 tokens per step, rotary positions,
    # QK-norm and Muon; weight decay 0.3 instead of dropout against overfitting the 1 MB text.
    "cpu": dict(max_iters=1000, eval_interval=250, eval_iters=10, batch_size=32,
                grad_accum_steps=1, n_layer=2, dropout=0.0, rotary=True, qk_norm=True,
                optimizer="muon", learning_rate=3e-3, min_lr=1e-5, warmup_iters=30,
                weight_decay=0.3),
    # nanoGPT's finetune_shakespeare: GPT-2 124M's weights, 32,768 tokens per step (micro-batch
    # 1 x block 1024 x 32 accumulation steps), a constant 3e-5 for 20 steps. Not yet measured:
    # it wants a GPU (about 10 GB of memory in float32) and GPT-2's weights on disk.
    "finetune": dict(init_from="gpt2", block_size=1024, batch_size=1, grad_accum_steps=32,
                     learning_rate=3e-5, min_lr=3e-5, lr_schedule="constant", warmup_iters=0,
                     max_iters=20, eval_interval=5, eval_iters=40, dropout=0.0),
}

FAMILY = ModelFamily(kind="gpt", tokenizers=("bpe", "gpt2"),
                     default_data=data_folder_name("bpe", DEFAULT_BPE_VOCAB),
                     model_cls=GPT, config_cls=GPTConfig,
                     recipe=RECIPE, presets=PRESETS, pad_vocab_to=64, default_top_k=50,
                     load_pretrained=load_gpt2)
