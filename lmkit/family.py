"""What the shared training and sampling code needs to know about one model family."""
from dataclasses import dataclass, field
from typing import Callable, Optional


@dataclass
class ModelFamily:
    kind: str              # "bigram" or "gpt": the folder, and the default run name
    tokenizers: tuple      # the tokenizers whose prepared data the model reads: char, gpt2, bpe
    default_data: str      # the folder in data/ it reads unless --data-dir says otherwise
    model_cls: type
    config_cls: type       # the model's config dataclass: its defaults are the seed architecture
    recipe: dict           # the seed recipe's training values (lmkit.config.TrainConfig fields)
    presets: dict = field(default_factory=dict)  # name -> flag values that differ from the seed
    pad_vocab_to: int = 1  # round the tokenizer's vocabulary up to a multiple of this
    default_top_k: int = None  # sampling's default --top-k
    # --init-from: (source, block_size) -> (config values, state_dict), for families that can
    load_pretrained: Optional[Callable] = None

    def model_config(self, model_values: dict, vocab_size: int):
        """The model's config; model_values may fix vocab_size (pretrained weights do)."""
        vocab = -(-vocab_size // self.pad_vocab_to) * self.pad_vocab_to
        return self.config_cls(**{"vocab_size": vocab, **model_values})
