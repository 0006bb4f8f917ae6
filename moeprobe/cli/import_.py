"""``moeprobe import {vllm,sglang,megatron} FILES... -o TRACE``: routing an engine emitted, as a moeprobe trace."""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Any, NoReturn

from .args import parse_tags
from .main import UsageError

HELP = "import routing saved by vLLM, SGLang or Megatron-Core into a trace"

EPILOG = """sources (docs/engines.md has the flags that turn routing on in each engine):
  vllm      saved /v1/completions, /v1/chat/completions or generate responses (JSON, JSONL, or a saved
            SSE stream) with routed_experts; needs --num-experts
  sglang    /generate responses with meta_info.routed_experts (JSON/JSONL; needs --num-experts and
            --num-layers or --top-k), or .pt dumps of /dump_expert_distribution_record (stat and per_pass
            dumps hold counts only and need --top-k)
  megatron  router_trace_rank<N>.jsonl files or their directory (logits_rank<N>.bin sidecars are read
            when the records point into them); needs --num-experts unless logits were captured

examples:
  moeprobe import vllm responses.jsonl -o traces/vllm --num-experts 64 --tag domain=code
  moeprobe import sglang expert_distribution_recorder_*.pt -o traces/sglang --top-k 8
  moeprobe import megatron /data/router_traces -o traces/megatron --num-experts 128"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see moeprobe import --help)")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="moeprobe import", description=HELP, epilog=EPILOG,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("engine", choices=("vllm", "sglang", "megatron"), help="which engine wrote the files")
    parser.add_argument("files", nargs="+", type=Path, help="response or dump files (a directory for megatron)")
    parser.add_argument("-o", "--output", required=True, type=_location, help="trace directory (or s3://bucket/prefix) to write")
    parser.add_argument("--force", action="store_true", help="overwrite an existing trace")
    parser.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE", help="tag every imported sequence")
    parser.add_argument("--num-experts", type=int, metavar="E", help="routed experts per MoE layer (logical)")
    parser.add_argument("--num-layers", type=int, metavar="L", help="MoE layers (SGLang /generate buffers)")
    parser.add_argument("--top-k", type=int, metavar="K", help="experts per token (SGLang buffers and count dumps)")
    parser.add_argument("--model", metavar="NAME", help="model name for the manifest (default: from the responses)")
    parser.add_argument("--engine-version", metavar="V", help="engine version for the manifest")
    parser.add_argument("--max-mb", type=float, default=2048, metavar="MB",
                        help="refuse any input file or decoded payload larger than this (default 2048)")
    return parser


def _positive(value: int | None, flag: str) -> None:
    if value is not None and value < 1:
        raise UsageError(f"{flag} should be a positive integer, got {value}")


def main(argv: list[str]) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    tags = parse_tags(args.tag)
    for value, flag in ((args.num_experts, "--num-experts"), (args.num_layers, "--num-layers"), (args.top_k, "--top-k")):
        _positive(value, flag)
    if not args.max_mb > 0:
        raise UsageError("--max-mb should be positive")
    limit = int(args.max_mb * (1 << 20))

    from ..importers.errors import ImportInputError
    from ..importers.sink import TraceSink

    plan = _plan(args, limit)
    from ..traces.remote_writer import remote_has_objects

    existed = remote_has_objects(args.output) if isinstance(args.output, str) else args.output.exists()
    sink = TraceSink(
        args.output, engine=args.engine, version=args.engine_version, files=[str(f) for f in args.files],
        model_name=args.model or plan["model"], mode=plan["mode"], force=args.force,
        world_size=plan["world_size"], tags=tags,
    )
    try:
        summary = plan["run"](sink)
    except ImportInputError as exc:
        if sink.empty:
            if not existed or args.force:
                _remove(args.output)  # nothing written: leave no half-made trace
        else:
            sink.close("aborted", str(exc))
        raise
    except BaseException as exc:
        if not sink.empty:
            sink.close("aborted", f"{type(exc).__name__}: {exc}")
        raise
    if sink.empty:
        _remove(args.output)
        raise ImportInputError(f"{args.files[0]}: no routing found in the input")
    sink.close("complete")
    layers = sink.layers or []
    shape = f"{len(layers)} layer(s), {layers[0]['num_experts']} experts, top-{layers[0]['top_k']}" if layers else "no layers"
    print(f"moeprobe import: {summary} ({shape}, mode {sink.mode}) -> {args.output}")
    return 0


def _location(value: str) -> Path | str:
    from ..traces.storage import location

    return location(value)  # type: ignore[no-any-return]


def _remove(output: Path | str) -> None:
    """Delete a trace this command created and wrote nothing into (a directory, or objects under an s3:// URL)."""
    if isinstance(output, str):
        from ..traces.remote_writer import remove_remote

        remove_remote(output, None)
    else:
        shutil.rmtree(output, ignore_errors=True)


def _plan(args: argparse.Namespace, limit: int) -> dict[str, Any]:
    """What to read and how: the trace's mode and world size must be known before its first shard exists."""
    if args.engine == "vllm":
        return _plan_vllm(args, limit)
    if args.engine == "sglang":
        return _plan_sglang(args, limit)
    return _plan_megatron(args, limit)


def _plan_vllm(args: argparse.Namespace, limit: int) -> dict[str, Any]:
    from ..importers import vllm
    from ..importers.responses import load_responses

    if args.num_experts is None:
        raise UsageError("vLLM responses carry expert ids only: give --num-experts (the model's routed experts per layer)")
    loaded = [item for path in args.files for item in load_responses(path, limit)]
    model = next((str(r["model"]) for _, r in loaded if isinstance(r.get("model"), str)), None)

    def run(sink: Any) -> str:
        sequences = 0
        for step, (where, response) in enumerate(loaded):
            sequences += vllm.write_response(sink, response, where, step=step, first_sequence=sequences,
                                             num_experts=args.num_experts, limit=limit)
        return f"{len(loaded)} response(s), {sequences} sequence(s)"

    return {"mode": "tokens", "world_size": 1, "model": model, "run": run}


def _plan_sglang(args: argparse.Namespace, limit: int) -> dict[str, Any]:
    from ..importers import sglang
    from ..importers.responses import load_responses

    dumps = [p for p in args.files if p.suffix == ".pt"]
    responses = [p for p in args.files if p.suffix != ".pt"]
    payloads = [(str(p), sglang.load_dump(p, limit)) for p in dumps]
    kinds = {sglang.dump_kind(payload) for _, payload in payloads}
    counts = kinds & {"stat", "per_pass"}
    if counts and (responses or "per_token" in kinds):
        raise UsageError("count dumps (stat, per_pass) and per-token input cannot go in one trace; import them separately")
    if responses and args.num_experts is None:
        raise UsageError("SGLang /generate responses carry expert ids only: give --num-experts")
    loaded = [item for path in responses for item in load_responses(path, limit)]
    ranks = [int(p.get("rank", 0)) for _, p in payloads if isinstance(p.get("rank", 0), int)]
    ranks += [int(r.get("rank", 0)) for _, p in payloads for r in (p.get("records") or []) if isinstance(r, dict)
              and isinstance(r.get("rank", 0), int)]

    def run(sink: Any) -> str:
        steps = sequences = 0
        for where, payload in payloads:
            used_steps, used_sequences = sglang.write_dump(sink, payload, where, first_step=steps,
                                                           first_sequence=sequences, top_k=args.top_k)
            steps += used_steps
            sequences += used_sequences
        for where, response in loaded:
            sequences += sglang.write_generate_response(
                sink, response, where, step=steps, first_sequence=sequences, num_experts=args.num_experts,
                num_layers=args.num_layers, top_k=args.top_k, limit=limit,
            )
            steps += 1
        return f"{len(payloads)} dump(s), {len(loaded)} response(s), {steps} step(s), {sequences} sequence(s)"

    return {"mode": "counts" if counts else "tokens", "world_size": max(ranks, default=0) + 1, "model": None, "run": run}


def _plan_megatron(args: argparse.Namespace, limit: int) -> dict[str, Any]:
    from ..importers import megatron

    files = megatron.expand(args.files)

    def run(sink: Any) -> str:
        megatron.import_files(sink, args.files, num_experts=args.num_experts, limit=limit)
        return f"{len(files)} rank file(s)"

    return {"mode": "tokens", "world_size": max(rank for rank, _ in files) + 1, "model": None, "run": run}


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
