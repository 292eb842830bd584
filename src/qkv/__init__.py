"""qkv: the Transformer of "Attention Is All You Need", built from attention up."""

__version__ = "0.1.0"
