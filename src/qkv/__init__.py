"""qkv: the Transformer of "Attention Is All You Need", built from attention up."""

import warnings

__version__ = "0.1.0"


def load(path, **options):
    """A `qkv.translate.Translator` for a run directory or checkpoint file:
    ``qkv.load("runs/de_en").translate(["Ein Hund läuft."], beam=5)``. Options as `Translator.load`
    (tokenizer, device, precision, warn, compile, say). A directory that `qkv export --format
    ctranslate2` wrote gives a `qkv.export.ct2_translator.CTranslate2Translator`, one of `--format
    onnx` a `qkv.onnx.OnnxTranslator`, with the same methods (`compile` does not apply to them: they
    run on their own engines, and say so). Imports torch only when called, so `import qkv` stays
    cheap."""
    from qkv.export.ct2_translator import CTranslate2Translator, is_ctranslate2_dir

    if is_ctranslate2_dir(path):
        exported = CTranslate2Translator
    else:  # qkv.onnx imports torch: not for a CTranslate2 directory
        from qkv.onnx import OnnxTranslator, is_onnx_dir
        from qkv.translate import Translator

        if not is_onnx_dir(path):
            return Translator.load(path, **options)
        exported = OnnxTranslator
    options.pop("say", None)  # what compiling would tell: nothing to compile here
    if options.pop("compile", False):
        warn = options.get("warn") or warnings.warn
        warn(f"{path}: an exported model runs on its own engine; the compiled step does not apply")
    return exported(path, **options)
