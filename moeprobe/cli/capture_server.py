"""``moeprobe capture-server --url URL --engine vllm|sglang --prompts FILE -o TRACE``: record a serving engine."""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import NoReturn

from .main import UsageError

HELP = "send prompts to a running vLLM/SGLang server and record the routing it returns"

EPILOG = """the server must return routing: vLLM with --aux-output-config '{"enable_return_routed_experts": true}',
SGLang with --enable-return-routed-experts (docs/engines.md). Prompts: one JSON object per line with "prompt"
(or "messages" for vLLM chat); --tag-field names keys whose values become tags of that request.

example:
  moeprobe capture-server --url http://127.0.0.1:8000 --engine vllm --prompts prompts.jsonl \\
      --tag-field domain --num-experts 64 -o traces/served"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see moeprobe capture-server --help)")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="moeprobe capture-server", description=HELP, epilog=EPILOG,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True, help="server base URL, e.g. http://127.0.0.1:8000")
    parser.add_argument("--engine", required=True, choices=("vllm", "sglang"))
    parser.add_argument("--prompts", required=True, type=Path, help="JSONL file of prompts")
    parser.add_argument("-o", "--output", required=True, type=Path, help="trace directory to write")
    parser.add_argument("--tag-field", action="append", default=[], metavar="KEY", help="prompt field to tag with")
    parser.add_argument("--num-experts", type=int, required=True, metavar="E", help="routed experts per MoE layer")
    parser.add_argument("--num-layers", type=int, metavar="L", help="MoE layers (SGLang)")
    parser.add_argument("--top-k", type=int, metavar="K", help="experts per token (SGLang)")
    parser.add_argument("--model", help="model name to request (vLLM) and record")
    parser.add_argument("--max-tokens", type=int, default=16, metavar="N", help="tokens to generate per prompt")
    parser.add_argument("--stream", action="store_true", help="vLLM: request streaming (SSE) responses")
    parser.add_argument("--concurrency", type=int, default=8, metavar="N", help="requests in flight at most (default 8)")
    parser.add_argument("--timeout", type=float, default=120.0, metavar="S", help="seconds per request")
    parser.add_argument("--engine-version", metavar="V", help="engine version for the manifest")
    parser.add_argument("--force", action="store_true", help="overwrite an existing trace")
    return parser


def main(argv: list[str]) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    for value, flag in ((args.num_experts, "--num-experts"), (args.concurrency, "--concurrency"),
                        (args.max_tokens, "--max-tokens"), (args.num_layers, "--num-layers"), (args.top_k, "--top-k")):
        if value is not None and value < 1:
            raise UsageError(f"{flag} should be a positive integer, got {value}")
    if not args.url.startswith(("http://", "https://")):
        raise UsageError(f"--url {args.url!r}: expected http://HOST:PORT")
    if args.engine == "sglang" and args.num_layers is None and args.top_k is None:
        raise UsageError("SGLang returns a raw id buffer: give --num-layers or --top-k to shape it")
    if args.stream and args.engine != "vllm":
        raise UsageError("--stream applies to vLLM only")

    from ..importers.capture import CaptureOptions, capture, read_prompts
    from ..safe_text import printable
    from ..importers.sink import TraceSink

    options = CaptureOptions(
        url=args.url, engine=args.engine, num_experts=args.num_experts, model=args.model, max_tokens=args.max_tokens,
        stream=args.stream, concurrency=args.concurrency, timeout=args.timeout, num_layers=args.num_layers,
        top_k=args.top_k,
    )
    prompts = read_prompts(args.prompts, args.tag_field, options.limit)
    sink = TraceSink(
        args.output, engine=args.engine, version=args.engine_version, files=[args.url, str(args.prompts)],
        model_name=args.model, mode="tokens", force=args.force, kind="capture-server",
    )
    try:
        result = capture(sink, prompts, options)
    except BaseException as exc:
        if not sink.empty:
            sink.close("aborted", "interrupted" if isinstance(exc, KeyboardInterrupt) else f"{type(exc).__name__}: {exc}")
        raise
    if sink.empty:
        shutil.rmtree(args.output, ignore_errors=True)
        first = result.failures[0] if result.failures else "no response"
        print(f"moeprobe capture-server: no response carried routing ({len(result.failures)} failed; first: {printable(first)})",
              file=sys.stderr)
        return 1
    sink.close("complete")
    print(f"moeprobe capture-server: {result.written} of {len(prompts)} responses recorded -> {args.output}")
    if result.failures:
        print(f"moeprobe capture-server: {len(result.failures)} request(s) failed; first: {printable(result.failures[0])}",
              file=sys.stderr)
        return 1
    return 0
