"""Named corpora: Multi30k (found locally or downloaded once, checksummed) and a built-in task.

The built-in task, dates written out in words -> ISO 8601, needs no download: qkv generates it
from a seed. It needs attention, not copying: the year comes last in the words and first in the
ISO form, and the day and month come in one of three orders.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
import random
import sys
import urllib.error
import urllib.request
from pathlib import Path

from qkv.atomic import atomic_write
from qkv.errors import QkvError

# ---------------------------------------------------------------------------------------------
# Where data lives


def resolve_data_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The data folder: an explicit argument, else $QKV_DATA_DIR, else the user cache folder."""
    if explicit is not None:
        return Path(explicit)
    if os.environ.get("QKV_DATA_DIR"):
        return Path(os.environ["QKV_DATA_DIR"])
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "qkv"


# ---------------------------------------------------------------------------------------------
# Multi30k (Elliott et al., 2016): the official raw files of github.com/multi30k/dataset, task 1.

MULTI30K_URL = "https://github.com/multi30k/dataset/raw/master/data/task1/raw"
MULTI30K_LANGS = ("de", "en", "fr", "cs")
MULTI30K_SPLITS = (
    "train",
    "val",
    "test_2016_flickr",
    "test_2017_flickr",
    "test_2017_mscoco",
    "test_2018_flickr",
)

# sha256 of each file the repository has. A value of None means the sum was not at hand when this
# table was written: such a file is downloaded without a check (its sum is shown so it can be
# added here). Never invent a sum: a wrong one would reject every good download.
MULTI30K_SHA256: dict[str, str | None] = {
    "train.de.gz": "726e39b2fa9eb9ffb6dc763fb35a179f80fae06ffc5d28b6ace5faa883de28a6",
    "train.en.gz": "d79cfa999dd4c51d2cb42499b6796d5a882c3a8a961923c25a898c90f8bbd56f",
    "train.fr.gz": "622e75069e9f4c577425c4f277116ce66e63a2401c0a2312d90073cb12379a3c",
    "train.cs.gz": "a65adb8b32e3bc664f21ecba7a6e7f6950fd1f405e135f7c312faabdb6255077",
    "val.de.gz": "f0cba2f995189cf5770f29a8a9a537a3ad3f51657ad873405082ff6863a5e75a",
    "val.en.gz": "14f7d25ddd868909a9213e361768460edcacdd6ab9d1e77b92560dc10c10dc28",
    "val.fr.gz": "ca3106f1a72390591d25f6c45cb4cd39dec4cd3f123e099748a3ce5256c160e9",
    "val.cs.gz": "b63226e05c4bd5dd6a42897d74b86a1b9d2c31498252c572b1ea7f7996927fcc",
    "test_2016_flickr.de.gz": "9204244e408ccb38d2a55cfcd344df15005fc42a07a6e55ca6c52b6ababb8cc8",
    "test_2016_flickr.en.gz": "611d361c6334bc7246101d48097c13cf5c4413c5befc793cc629934359d532d9",
    "test_2016_flickr.fr.gz": "6d326e188d259fb1d04ac19eae3af956559b3a0b93d7635e56c90987c40c8b90",
    "test_2016_flickr.cs.gz": "200a4a74cc9560f051924abb9803be008d1908d77f747e9141aeb86dfd2797f1",
    # The later test sets: checksum verified on first download only when known (not yet).
    # 2017 sets exist in de, en, fr only; 2018 in all four languages.
    "test_2017_flickr.de.gz": None,
    "test_2017_flickr.en.gz": None,
    "test_2017_flickr.fr.gz": None,
    "test_2017_mscoco.de.gz": None,
    "test_2017_mscoco.en.gz": None,
    "test_2017_mscoco.fr.gz": None,
    "test_2018_flickr.de.gz": None,
    "test_2018_flickr.en.gz": None,
    "test_2018_flickr.fr.gz": None,
    "test_2018_flickr.cs.gz": None,
}


def multi30k_file(
    split: str,
    lang: str,
    data_dir: str | os.PathLike | None = None,
    base_url: str | None = None,
    progress: bool = True,
) -> Path:
    """Path of `multi30k/{split}.{lang}.gz` in the data folder, downloaded there if missing.

    `base_url` (or $QKV_MULTI30K_URL) replaces the official repository, e.g. for a mirror.
    """
    name = f"{split}.{lang}.gz"
    if split not in MULTI30K_SPLITS:
        raise QkvError(f"multi30k has no split {split!r}; splits: {', '.join(MULTI30K_SPLITS)}")
    if lang not in MULTI30K_LANGS:
        raise QkvError(f"multi30k has no language {lang!r}; languages: {', '.join(MULTI30K_LANGS)}")
    if name not in MULTI30K_SHA256:
        have = sorted(n.split(".")[1] for n in MULTI30K_SHA256 if n.startswith(f"{split}."))
        raise QkvError(f"multi30k has no {split} set in {lang!r}, only in {', '.join(have)}")
    folder = resolve_data_dir(data_dir) / "multi30k"
    path = folder / name
    if path.is_file():
        return path
    base_url = base_url or os.environ.get("QKV_MULTI30K_URL") or MULTI30K_URL
    url = f"{base_url.rstrip('/')}/{name}"
    made_folder = not folder.exists()
    try:
        download(url, path, MULTI30K_SHA256[name], progress=progress)
    except (urllib.error.URLError, OSError, TimeoutError, QkvError) as error:
        if made_folder:  # a failed first download leaves no empty multi30k/ to puzzle over
            with contextlib.suppress(OSError):
                folder.rmdir()
        if isinstance(error, QkvError):  # a wrong checksum: its own message
            raise
        reason = getattr(error, "reason", None) or error
        raise QkvError(
            f"multi30k file {name} is missing: looked for {path}; downloading {url} failed "
            f"({reason}). If you have a copy of Multi30k, set QKV_DATA_DIR (or --data-dir) to the "
            f"folder that holds multi30k/{name}"
        ) from None
    return path


def download(url: str, path: Path, sha256: str | None, progress: bool = True) -> None:
    """Fetch `url` to `path` atomically, with a progress bar; a wrong checksum keeps nothing."""
    atomic_write(path, lambda out: _fetch(url, out, sha256, progress, path))


def _fetch(url: str, out, sha256: str | None, progress: bool, path: Path) -> None:
    from tqdm import tqdm

    digest = hashlib.sha256()
    with urllib.request.urlopen(url, timeout=60) as response:
        size = int(response.headers.get("Content-Length") or 0) or None
        with tqdm(
            total=size,
            unit="B",
            unit_scale=True,
            desc=path.name,
            file=sys.stderr,
            disable=not progress,
        ) as bar:
            while chunk := response.read(1 << 16):
                out.write(chunk)
                digest.update(chunk)
                bar.update(len(chunk))
    if sha256 is not None and digest.hexdigest() != sha256:
        raise QkvError(
            f"{url}: downloaded file has sha256 {digest.hexdigest()} but {path.name} should have "
            f"{sha256}; it was not kept (a corrupted or changed download): try again, or put a "
            f"good copy at {path}"
        )


# ---------------------------------------------------------------------------------------------
# The built-in task: "the third of march nineteen ninety-four" -> "1994-03-03"

SYNTHETIC_LANGS = ("words", "iso")
_FIRST_DAY = datetime.date(1900, 1, 1).toordinal()
_LAST_DAY = datetime.date(2099, 12, 31).toordinal()
_ORDERS = 3  # "the third of march", "march the third", "third march"

# fmt: off
_UNITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
_TEENS = ["ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen",
          "eighteen", "nineteen"]
_TENS = ["_", "_", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
_UNIT_ORDINALS = ["_", "first", "second", "third", "fourth", "fifth", "sixth", "seventh",
                  "eighth", "ninth"]
_TEEN_ORDINALS = ["tenth", "eleventh", "twelfth", "thirteenth", "fourteenth", "fifteenth",
                  "sixteenth", "seventeenth", "eighteenth", "nineteenth"]
_MONTHS = ["january", "february", "march", "april", "may", "june", "july", "august", "september",
           "october", "november", "december"]
# fmt: on


def _cardinal(n: int) -> str:
    """0..99 in words: 'seven', 'fourteen', 'ninety-four'."""
    if n < 10:
        return _UNITS[n]
    if n < 20:
        return _TEENS[n - 10]
    tens, unit = divmod(n, 10)
    return _TENS[tens] + (f"-{_UNITS[unit]}" if unit else "")


def _ordinal(n: int) -> str:
    """1..31 in words: 'first', 'twelfth', 'twenty-third', 'thirtieth'."""
    if n < 10:
        return _UNIT_ORDINALS[n]
    if n < 20:
        return _TEEN_ORDINALS[n - 10]
    tens, unit = divmod(n, 10)
    if unit == 0:
        return _TENS[tens][:-1] + "ieth"  # twenty -> twentieth
    return f"{_TENS[tens]}-{_UNIT_ORDINALS[unit]}"


def _year(year: int) -> str:
    """1900..2099 as spoken: 'nineteen hundred', 'nineteen oh five', 'two thousand and five'."""
    century, rest = divmod(year, 100)
    if century == 20 and rest < 10:
        return "two thousand" + (f" and {_UNITS[rest]}" if rest else "")
    if rest == 0:
        return f"{_cardinal(century)} hundred"
    if rest < 10:
        return f"{_cardinal(century)} oh {_UNITS[rest]}"
    return f"{_cardinal(century)} {_cardinal(rest)}"


def date_in_words(date: datetime.date, order: int) -> str:
    day, month, year = _ordinal(date.day), _MONTHS[date.month - 1], _year(date.year)
    if order == 0:
        return f"the {day} of {month} {year}"
    if order == 1:
        return f"{month} the {day} {year}"
    return f"{day} {month} {year}"


def synthetic_pairs(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """`n` distinct (date in words, ISO date) pairs, the same for the same seed.

    Drawn without replacement, so slices of one call (train, val, test) never share a pair.
    """
    space = (_LAST_DAY - _FIRST_DAY + 1) * _ORDERS
    if not 0 < n <= space:
        raise QkvError(f"the synthetic task has {space} distinct pairs; asked for {n}")
    pairs = []
    for code in random.Random(seed).sample(range(space), n):
        day, order = divmod(code, _ORDERS)
        date = datetime.date.fromordinal(_FIRST_DAY + day)
        pairs.append((date_in_words(date, order), date.isoformat()))
    return pairs
