"""Printing generated harmony tokens as they arrive: channels told apart, UTF-8 kept whole."""

from __future__ import annotations

import codecs
from typing import TextIO

import tiktoken

from gptoss_jax import tokenizer as tok

DIM, RESET = "\x1b[2m", "\x1b[0m"


class ChannelPrinter:
    """Feeds on generated token ids; writes message contents to `out`, the `analysis` and
    `commentary` channels dimmed (when `color`), the `final` channel plainly. Header tokens
    (`<|start|>assistant<|channel|>final<|message|>`) are not shown. With `raw`, prints all text."""

    def __init__(self, encoding: tiktoken.Encoding, out: TextIO, color: bool = True, raw: bool = False):
        self.encoding, self.out, self.color, self.raw = encoding, out, color, raw
        self.in_header = not raw
        self.header: list[int] = []
        self.dimmed = False
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token: int) -> None:
        if self.raw:
            self._write(self.encoding.decode_single_token_bytes(token))
        elif token == tok.MESSAGE and self.in_header:
            text = self.encoding.decode(self.header)
            channel = text.split("<|channel|>", 1)[1].split()[0] if "<|channel|>" in text else "final"
            self.dimmed = self.color and channel != "final"
            if channel != "final":
                self.out.write(f"{DIM if self.color else ''}[{channel}] ")
            self.in_header, self.header = False, []
        elif self.in_header:
            self.header.append(token)
        elif token in (tok.END, tok.RETURN, tok.CALL):
            self._write(b"", final=True)
            self.out.write(f"{RESET if self.dimmed else ''}\n")
            self.in_header, self.dimmed = True, False
        else:
            self._write(self.encoding.decode_single_token_bytes(token))
        self.out.flush()

    def close(self) -> None:
        self._write(b"", final=True)
        self.out.write(f"{RESET if self.dimmed else ''}\n")
        self.out.flush()

    def _write(self, data: bytes, final: bool = False) -> None:
        self.out.write(self.decoder.decode(data, final))
