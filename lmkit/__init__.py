"""What the bigram and GPT models share: data, tokenizers, training, checkpoints, plots, sampling."""
