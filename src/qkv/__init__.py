"""qkv: the Transformer of "Attention Is All You Need", built from attention up."""

__version__ = "0.1.0"


def load(path, **options):
    """A `qkv.translate.Translator` for a run directory or checkpoint file:
    ``qkv.load("runs/de_en").translate(["Ein Hund läuft."], beam=5)``. Options as `Translator.load`
    (tokenizer, device, precision). Imports torch only when called, so `import qkv` stays cheap."""
    from qkv.translate import Translator

    return Translator.load(path, **options)
