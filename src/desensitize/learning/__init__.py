"""Training and evaluating classifiers: the loops, and the checkpoint format (the architectures they
train are desensitize.models and desensitize.masknet)."""
