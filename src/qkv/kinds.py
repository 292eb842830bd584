"""The three kinds of attention in the encoder-decoder Transformer (paper section 3.2.3), as the
command line, the pictures and the step-by-step name them. No torch here: `qkv --help` stays instant."""

KINDS = ("encoder", "decoder", "cross")  # encoder self-attention, decoder self-attention, cross
