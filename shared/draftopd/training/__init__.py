"""Drafter training: data, SFT with training-time test, Draft-OPD replay."""
