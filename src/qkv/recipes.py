"""The bundled recipes (src/qkv/configs/*.toml), found by name. No torch here: `qkv --help` lists
them instantly."""

from __future__ import annotations

from qkv.errors import QkvError


def recipe_names() -> list[str]:
    from importlib.resources import files

    return sorted(
        p.name.removesuffix(".toml")
        for p in files("qkv").joinpath("configs").iterdir()
        if p.name.endswith(".toml")
    )


def resolve_recipe(name: str):
    """A config path as given, or the bundled recipe of that name."""
    from importlib.resources import files
    from pathlib import Path

    path = Path(name)
    if path.suffix == ".toml" or path.exists():
        return path
    bundled = files("qkv").joinpath("configs", f"{name}.toml")
    if bundled.is_file():
        return Path(str(bundled))
    raise QkvError(f"{name}: no such config file or bundled recipe ({', '.join(recipe_names())})")
