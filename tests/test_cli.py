"""The command line end to end: demo, generate and chat on a random built-in model, streaming."""

import io

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
