"""SFT bootstrap: the training loop (``train``) and the prompts-to-checkpoint ``pipeline``."""
