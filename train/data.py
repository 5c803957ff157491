"""Training data: JSONL of harmony conversations (or plain text) -> padded, masked batches, each
process reading only its own rows.

Input lines (JSONL):
- `{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "channel": "final",
  "content": "..."}, ...]}`: a harmony conversation (`role`, `content`, optional `channel`,
  `recipient`, `content_type`, `name`), rendered like `harmony.render_for_training` (analysis before
  a final answer dropped, a closing final answer ending in `<|return|>`). The loss counts the tokens
  the model would write as the assistant: each assistant message after its `<|start|>assistant`.
- `{"text": "..."}`: plain text, every token counted. A `.txt` file: one example per non-empty line.

Malformed lines (bad JSON, unknown fields, a conversation without an assistant message) are reported
with their line number and skipped, or stop the run (`on_error="stop"`). Examples longer than the
sequence length are truncated (counted in `Dataset.truncated`).

Order: the global stream of examples is epoch after epoch of a permutation seeded by (seed, epoch),
so the batch of any step is a pure function of the step: the checkpointed iterator position is the
number of examples consumed, and resuming anywhere reproduces the same batches. Each global
micro-batch's rows are split evenly over processes (grain's `ShardByJaxProcess` in spirit); a
process tokenizes only the examples of its own rows, lazily.

Rows are padded to the sequence length (positions -1, weights 0), one example per row, or, with
`packing`, filled greedily with whole examples in the same shuffled order (a row is closed when the
next example does not fit; that example opens the next row, the next step's first row included).
A packed row's examples have positions from 0 each and segment ids 1, 2, ... (0 on the padding at
the row's end), so attention stays within each example (`attention.visible`); each example's inputs
are its tokens[:-1] and its targets its tokens[1:], so no target crosses an example boundary, and
the loss is the padded layout's, token for token. How many examples a packed step takes depends on
their lengths: the data position of step s is found by packing steps 0..s-1 (or from a checkpoint's
position, `Batches.seek`), and every process tokenizes every example of a step to place the rows.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gptoss_jax import harmony
from gptoss_jax import tokenizer as tok

MESSAGE_FIELDS = {"role", "content", "channel", "recipient", "content_type", "name"}


class DataError(ValueError):
    """Bad training data: names the file and line."""


@dataclasses.dataclass
class Example:
    tokens: list[int]
    mask: list[int]  # 1 where the token is one the model should learn to write


def conversation_tokens(messages: Sequence[harmony.Message], encoding: Any) -> Example:
    """Tokens and assistant mask of a conversation, rendered as `harmony.render_for_training`."""
    kept = harmony._kept_messages(messages, drop_analysis=True)
    has_functions = harmony._has_function_tools(messages)
    tokens: list[int] = []
    mask: list[int] = []
    for message in kept:
        rendered = harmony.render_message(message, encoding, has_functions)
        if message.role == "assistant":
            prompt = 1 + len(encoding.encode_ordinary("assistant"))  # <|start|>assistant: what a prompt ends with
            tokens += rendered
            mask += [0] * prompt + [1] * (len(rendered) - prompt)
        else:
            tokens += rendered
            mask += [0] * len(rendered)
    if kept and kept[-1].role == "assistant" and kept[-1].channel == "final":
        tokens[-1] = tok.RETURN
    return Example(tokens, mask)


def parse_messages(raw: Any) -> list[harmony.Message]:
    if not isinstance(raw, list) or not raw:
        raise ValueError('"messages" must be a non-empty list')
    messages = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise ValueError(f"message {i} is not an object")
        unknown = set(m) - MESSAGE_FIELDS
        if unknown:
            raise ValueError(f"message {i} has unknown fields {sorted(unknown)}")
        if m.get("role") not in harmony.ROLES:
            raise ValueError(f"message {i} has role {m.get('role')!r} (one of {', '.join(harmony.ROLES)})")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"message {i} has no string content")
        messages.append(harmony.Message(**m))
    if not any(m.role == "assistant" for m in messages):
        raise ValueError("no assistant message: nothing to learn")
    return messages


class Dataset:
    """The examples of one file, tokenized on first use.

    `tokenizer`: "harmony" (o200k_harmony; the default) or "bytes" (UTF-8 bytes as ids, plain text
    only: for tiny test models)."""

    def __init__(self, path: str | Path, *, seq_len: int, vocab_size: int, fmt: str = "auto",
                 on_error: str = "skip", tokenizer: str = "harmony",
                 report: Callable[[str], None] | None = None):
        if on_error not in ("skip", "stop"):
            raise ValueError(f"on_error must be 'skip' or 'stop', got {on_error!r}")
        self.path, self.seq_len, self.vocab_size, self.tokenizer = Path(path), seq_len, vocab_size, tokenizer
        self.report = report or (lambda msg: print(msg, file=sys.stderr))
        self.records: list[tuple[int, Any]] = []  # (line number, parsed record)
        self.skipped: list[int] = []
        self.truncated = 0
        self._cache: dict[int, Example] = {}
        self._encoding = None
        if not self.path.is_file():
            raise DataError(f"{self.path}: no such data file")
        plain = fmt == "text" or (fmt == "auto" and self.path.suffix == ".txt")
        for number, line in enumerate(self.path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = {"text": line} if plain else self._parse(line)
            except ValueError as err:
                message = f"{self.path}:{number}: {err}"
                if on_error == "stop":
                    raise DataError(message) from None
                self.report(f"skipping line {message}")
                self.skipped.append(number)
                continue
            self.records.append((number, record))
        if not self.records:
            raise DataError(f"{self.path}: no usable examples")

    def _parse(self, line: str) -> Any:
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"not valid JSON ({err.msg}, column {err.colno})") from None
        if not isinstance(raw, dict) or ("messages" in raw) == ("text" in raw):
            raise ValueError('expected an object with "messages" (a harmony conversation) or "text"')
        if "text" in raw:
            if not isinstance(raw["text"], str):
                raise ValueError('"text" must be a string')
            return {"text": raw["text"]}
        if self.tokenizer != "harmony":
            raise ValueError(f"conversations need the harmony tokenizer, not {self.tokenizer!r}")
        return {"messages": parse_messages(raw["messages"])}

    def __len__(self) -> int:
        return len(self.records)

    def _encode_text(self, text: str) -> list[int]:
        if self.tokenizer == "bytes":
            return list(text.encode("utf-8"))
        if self._encoding is None:
            self._encoding = tok.get_encoding()
        return self._encoding.encode_ordinary(text)

    def example(self, index: int) -> Example:
        """Tokens and mask of example `index`, at most seq_len + 1 tokens (truncated: counted)."""
        if index not in self._cache:
            number, record = self.records[index]
            if "text" in record:
                tokens = self._encode_text(record["text"])
                example = Example(tokens, [1] * len(tokens))
            else:
                if self._encoding is None:
                    self._encoding = tok.get_encoding()
                example = conversation_tokens(record["messages"], self._encoding)
            if example.tokens and max(example.tokens) >= self.vocab_size:
                raise DataError(f"{self.path}:{number}: token id {max(example.tokens)} is outside the model's "
                                f"vocabulary of {self.vocab_size}")
            if len(example.tokens) > self.seq_len + 1:
                self.truncated += 1
                example = Example(example.tokens[:self.seq_len + 1], example.mask[:self.seq_len + 1])
            self._cache[index] = example
        return self._cache[index]


def fill_rows(rows: Sequence[Sequence[Example]], seq_len: int, pad_id: int = 0, *,
              segments: bool = False) -> dict[str, np.ndarray]:
    """Rows of examples -> numpy arrays [rows, seq_len]: `inputs` (each example's tokens[:-1], then
    `pad_id`), `targets` (its tokens[1:]), `positions` (0.. per example, -1 on padding), `weights` (its
    mask[1:]), and with `segments` also `segments` (1, 2, ... per non-empty example, 0 on padding).
    Each row's examples must fit: sum(len(tokens) - 1) <= seq_len."""
    shape = (len(rows), seq_len)
    out = {"inputs": np.full(shape, pad_id, np.int32), "targets": np.zeros(shape, np.int32),
           "positions": np.full(shape, -1, np.int32), "weights": np.zeros(shape, np.float32)}
    if segments:
        out["segments"] = np.zeros(shape, np.int32)
    for r, examples in enumerate(rows):
        start, segment = 0, 0
        for example in examples:
            n = len(example.tokens) - 1
            if n <= 0:
                continue
            end, segment = start + n, segment + 1
            if end > seq_len:
                raise ValueError(f"row {r}: its examples take {end} tokens, more than seq_len {seq_len}")
            out["inputs"][r, start:end] = example.tokens[:-1]
            out["targets"][r, start:end] = example.tokens[1:]
            out["positions"][r, start:end] = np.arange(n)
            out["weights"][r, start:end] = example.mask[1:]
            if segments:
                out["segments"][r, start:end] = segment
            start = end
    return out


class Batches:
    """Step -> this process's rows of the global batch, as numpy arrays [accum, local batch, seq]:
    `inputs`, `targets`, `positions` (-1 on padding), `weights` (1 on tokens the loss counts), and
    with `packing` `segments` (see `fill_rows`)."""

    def __init__(self, dataset: Dataset, *, batch_size: int, accumulation: int = 1, seed: int = 0,
                 process_index: int = 0, process_count: int = 1, pad_id: int = 0, packing: bool = False):
        if batch_size % process_count:
            raise ValueError(f"global batch size {batch_size} is not divisible by {process_count} processes")
        self.dataset, self.batch_size, self.accumulation, self.seed = dataset, batch_size, accumulation, seed
        self.local = batch_size // process_count
        self.first_row = process_index * self.local
        self.pad_id, self.packing = pad_id, packing
        self._perms: dict[int, np.ndarray] = {}
        self._starts: dict[int, int] = {0: 0}  # packing: step -> examples consumed before it

    @property
    def rows_per_step(self) -> int:
        return self.batch_size * self.accumulation

    @property
    def examples_per_step(self) -> int:
        """Examples per step without packing (one per row); with packing it varies: see `position`."""
        return self.rows_per_step

    def _index(self, position: int) -> int:
        epoch, offset = divmod(position, len(self.dataset))
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.seed, epoch]).permutation(len(self.dataset))}
        return int(self._perms[epoch][offset])

    def position(self, step: int) -> int:
        """The data position before `step`: the number of examples the steps before it consumed."""
        if not self.packing:
            return step * self.examples_per_step
        for s in range(max(s for s in self._starts if s <= step), step):
            self._pack(s)
        return self._starts[step]

    def seek(self, step: int, position: int) -> None:
        """Takes a checkpoint's data position for `step` (a resumed run), so that packing goes on from
        there without repacking the steps before it."""
        if not self.packing and position != self.position(step):
            raise ValueError(f"data position {position} does not match step {step} "
                             f"({self.position(step)} = step x {self.examples_per_step} examples)")
        self._starts[step] = position

    def _pack(self, step: int) -> list[list[int]]:
        """The global rows of a packed step (dataset indices), greedily in stream order."""
        position = self.position(step)
        rows: list[list[int]] = [[]]
        used = empty = 0
        while True:
            index = self._index(position)
            n = max(len(self.dataset.example(index).tokens) - 1, 0)
            if used + n > self.dataset.seq_len:  # does not fit: the row is done, the example opens the next
                if len(rows) == self.rows_per_step:
                    break
                rows.append([])
                used = 0
                continue
            empty = empty + 1 if n == 0 else 0
            if empty > len(self.dataset):
                raise DataError(f"{self.dataset.path}: no example has 2 tokens or more: nothing to learn")
            rows[-1].append(index)
            used += n
            position += 1
        self._starts[step + 1] = position
        return rows

    def plan(self, step: int) -> list[list[int]]:
        """The dataset indices of each global row of `step` ([batch_size x accumulation] rows, in
        order: micro-batch, then row); one per row without packing."""
        if self.packing:
            return self._pack(step)
        start = self.position(step)
        return [[self._index(start + row)] for row in range(self.rows_per_step)]

    def batch(self, step: int) -> dict[str, np.ndarray]:
        plan = self.plan(step)
        mine = [plan[micro * self.batch_size + self.first_row + row]
                for micro in range(self.accumulation) for row in range(self.local)]
        rows = [[self.dataset.example(index) for index in row] for row in mine]
        out = fill_rows(rows, self.dataset.seq_len, self.pad_id, segments=self.packing)
        return {k: v.reshape(self.accumulation, self.local, -1) for k, v in out.items()}
