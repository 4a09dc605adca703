"""pqk: distill (K), prune (P) and quantize (Q) feed-forward transformers under one protocol."""

__version__ = "0.1.0"
