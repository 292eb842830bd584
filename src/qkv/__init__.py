"""qkv: the Transformer of "Attention Is All You Need", built from attention up."""

__version__ = "0.1.0"


def load(path, **options):
    """A `qkv.translate.Translator` for a run directory or checkpoint file:
    ``qkv.load("runs/de_en").translate(["Ein Hund läuft."], beam=5)``. Options as `Translator.load`
    (tokenizer, device, precision, warn). A directory that `qkv export --format ctranslate2` wrote
    gives a `qkv.export.ct2_translator.CTranslate2Translator`, one of `--format onnx` a
    `qkv.onnx.OnnxTranslator`, with the same methods. Imports torch
    only when called, so `import qkv` stays cheap."""
    from qkv.export.ct2_translator import CTranslate2Translator, is_ctranslate2_dir
    from qkv.translate import Translator

    if is_ctranslate2_dir(path):
        return CTranslate2Translator(path, **options)
    from qkv.onnx import OnnxTranslator, is_onnx_dir

    if is_onnx_dir(path):
        return OnnxTranslator(path, **options)
    return Translator.load(path, **options)
