"""A trained qkv model for other inference engines: `qkv export RUN --format ctranslate2 -o DIR`
(`qkv.export.ctranslate2`), and `qkv translate DIR` on what it wrote (`qkv.export.ct2_translator`)."""
