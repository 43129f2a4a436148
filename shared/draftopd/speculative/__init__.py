"""Speculative decoding: sampling transforms, pure verification, proposers and the decode loop."""
