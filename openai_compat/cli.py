"""The `lightgate` command: `serve`, `chat`, `bench offline`, `bench multiturn` and `bench serve`.

    lightgate serve --model ./my-model --port 8000
    lightgate chat --text "你好,世界!" --system "Answer briefly."
    lightgate bench offline --help
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"


def _serve_parser(parser: argparse.ArgumentParser) -> None:
    from openai_compat.config import add_cli_flags

    add_cli_flags(parser)


def run_serve(args: argparse.Namespace) -> int:
    from openai_compat.config import InvalidSettingsError, load_settings

    try:
        settings = load_settings(args)
    except InvalidSettingsError as e:
        print(f"lightgate serve: error: {e}", file=sys.stderr)
        return 2  # as argparse does for a bad flag
    from openai_compat.server import serve

    return serve(settings)


def run_chat(args: argparse.Namespace) -> int:
    import openai

    from openai_compat.client import Client

    client = Client(model=args.model, base_url=args.base_url, api_key=args.api_key)
    try:
        for piece in client.stream(args.text, system=args.system, max_tokens=args.max_tokens,
                                   temperature=args.temperature):
            sys.stdout.write(piece)
            sys.stdout.flush()
    except openai.APIConnectionError:
        print(f"\nerror: no lightgate server at {args.base_url} (start one with `lightgate serve`)", file=sys.stderr)
        return 1
    except openai.APIError as e:
        print(f"\nerror: {e.message}", file=sys.stderr)
        return 1
    sys.stdout.write("\n")
    return 0


def run_bench(name: str, argv: list[str]) -> int:
    # The engine's benchmarks; heavy imports only when asked for.
    if name == "offline":
        from bench import offline as bench

        bench.main(argv)
    elif name == "serve":
        from bench import serve as bench_serve

        return bench_serve.main(argv)
    else:
        from bench import multiturn as bench_multiturn

        bench_multiturn.main(argv)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lightgate", description="An OpenAI-compatible LLM server.")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser(
        "serve", help="start the server",
        description="Start the OpenAI-compatible server. Every flag can also be set as an environment variable "
        "LIGHTGATE_<NAME> or as a key of the --config file; a flag beats the environment (and .env), which "
        "beats the file.",
    )
    _serve_parser(serve)
    serve.set_defaults(func=run_serve)

    chat = commands.add_parser("chat", help="ask a running server, streaming the answer")
    chat.add_argument("--text", required=True, help="the user message")
    chat.add_argument("--system", default=None, help="a system message")
    chat.add_argument("--model", default=None, help="model name (default: the server's first)")
    chat.add_argument("--base-url", default=DEFAULT_BASE_URL, help=f"the server's /v1 URL (default {DEFAULT_BASE_URL})")
    chat.add_argument("--api-key", default=None, help="bearer token, when the server has API keys")
    chat.add_argument("--max-tokens", type=int, default=None, help="cap on the answer's tokens")
    chat.add_argument("--temperature", type=float, default=None, help="sampling temperature")
    chat.set_defaults(func=run_chat)

    bench = commands.add_parser("bench", help="benchmarks")
    bench_commands = bench.add_subparsers(dest="bench_command", required=True)
    # Its own flags are parsed by the benchmark itself: everything after `offline` is passed on.
    bench_commands.add_parser("offline", help="the engine beside transformers, in this process", add_help=False)
    bench_commands.add_parser("multiturn", help="multi-turn chats, prefix cache on vs off", add_help=False)
    bench_commands.add_parser("serve", help="a benchmark client for any OpenAI-compatible server", add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["bench"] and args_list[1:2] in (["offline"], ["multiturn"], ["serve"]):
        return run_bench(args_list[1], args_list[2:])
    args = build_parser().parse_args(args_list)
    status: int = args.func(args)
    return status


if __name__ == "__main__":
    sys.exit(main())
