"""A trained qkv model for other inference engines: `qkv export RUN --format ctranslate2 -o DIR`
(`qkv.export.ctranslate2`), and `qkv translate DIR` on what it wrote (`qkv.export.ct2_translator`)."""

# CTranslate2's weight types `qkv export --quantization` offers: here, without torch, so that building
# the command line's parser (`qkv --help`) imports no heavy module (`qkv.cli`).
QUANTIZATIONS = ("int8", "int8_float32", "int16", "float16", "bfloat16")
