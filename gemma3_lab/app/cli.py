"""`python -m gemma3_lab`: generate, compare precisions, inspect masks, verify against transformers,
convert GGUF."""

from __future__ import annotations

import argparse
import sys

from gemma3_lab.analysis.compare import PRECISIONS, compare, greedy_divergence, load_precision
from gemma3_lab.analysis.verify import load_reference, verify
from gemma3_lab.config import BUNDLED
from gemma3_lab.errors import Gemma3LabError
from gemma3_lab.load import bundled_gguf_path, load
from gemma3_lab.loading.quantize import DEFAULT
from gemma3_lab.loading.gguf_convert import cached_conversion, convert_gguf
from gemma3_lab.viz.mask_visualizer import AttentionMaskVisualizer

EXAMPLES = """examples:
  python -m gemma3_lab generate "The capital of France is"
  python -m gemma3_lab generate "Once upon a time" --sample --temperature 0.8 --top-p 0.95 --seed 1
  python -m gemma3_lab compare "Once upon a time" --b int4   # where int4's greedy parts from float32's, and why
  python -m gemma3_lab masks "The quick brown fox jumps" --window 3
  python -m gemma3_lab verify --tokens 32
  python -m gemma3_lab convert gemma-3-270m ./gemma-3-270m-hf   # the bundled GGUF, or any .gguf file
  python -m gemma3_lab info --model /path/to/gemma-3-4b-it

--model takes: gemma-3-270m (default, the bundled real weights), demo-multimodal
(270M + an UNTRAINED vision tower), a Hugging Face folder, or a .gguf file."""


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The examples epilog as written, and an option's default after its help (when it has one)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or action.default == []:
            return action.help  # "(default: None)" on a flag or an unset option says nothing
        return super()._get_help_string(action)


def _model_args(p: argparse.ArgumentParser, weights: bool = True, dtype: bool = True) -> None:
    p.add_argument("--model", default=BUNDLED,
                   help=f"{BUNDLED} (the bundled real weights), demo-multimodal, a Hugging Face folder or a .gguf file")
    if dtype:  # compare names its two precisions instead
        p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                       help="the dtype weights and activations are computed in")
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    if not weights:  # masks need only the config and tokenizer
        return
    p.add_argument("--quantize", default=None, choices=["int8", "int4"],
                   help="weight-only quantization of the decoder projections (activations stay in --dtype)")
    p.add_argument("--group-size", type=int, default=None,
                   help="input columns per (offset, step) group (default: int8 one per row, int4 32)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m gemma3_lab",
        description="Explore Gemma 3: generate with per-token probabilities, draw attention masks, "
        "check numerics against transformers, convert GGUF files.",
        epilog=EXAMPLES,
        formatter_class=_HelpFormatter,
    )
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", help="what to do; COMMAND --help shows its options")

    def command(name: str, about: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=about, description=about, formatter_class=_HelpFormatter)

    g = command("generate", "generate text, streaming tokens with their probabilities")
    g.add_argument("prompt", help="the prompt text")
    _model_args(g)
    g.add_argument("--chat", action="store_true", help="wrap the prompt as one user turn of the chat template")
    g.add_argument("--image", action="append", default=[], help="image file (repeatable); needs a vision model")
    g.add_argument("--pan-and-scan", action="store_true", help="add pan-and-scan crops for wide/tall images")
    g.add_argument("--max-new-tokens", type=int, default=64, help="stop after this many generated tokens")
    g.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--temperature", type=float, default=1.0, help="divide the logits by this before sampling")
    g.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens only")
    g.add_argument("--top-p", type=float, default=None, help="sample among the smallest set of tokens with this total probability")
    g.add_argument("--seed", type=int, default=None, help="seed of the sampler, for a repeatable sample")
    g.add_argument("--show-probs", action="store_true", help="print each token with its probability and top-3")
    step = g.add_mutually_exclusive_group()
    step.add_argument("--compile", action="store_true",
                      help="compile the decode step first (torch.compile; float32, int8, int4, and bfloat16 on CPUs "
                      "with native bfloat16; 30-90 s on two "
                      "cores, less with its disk cache warm; worth it for long generations) and decode with it; "
                      "nothing to compile where the native C step runs the model (float32, int8/int4 and "
                      "bfloat16 on CPUs with AVX-512 or AVX2): it is the default there")
    step.add_argument("--plain", action="store_true",
                      help="decode every token through the plain instrumented forward (no lean, native or compiled step)")

    k = command("compare", "run one prompt through two precisions of a model: where their greedy outputs part and "
                "how close the first one's choice was there, the next-token KL, the residual stream's error by layer")
    k.add_argument("prompt", help="the prompt text")
    _model_args(k, weights=False, dtype=False)
    k.add_argument("--a", default="float32", choices=list(PRECISIONS), help="the precision compared against")
    k.add_argument("--b", default="int4", choices=list(PRECISIONS), help="the precision compared with it")
    k.add_argument("--tokens", type=int, default=16, help="greedy tokens each one generates")

    m = command("masks", "print the attention mask of every distinct layer type")
    m.add_argument("prompt", help="the prompt text whose tokens the masks are drawn over")
    _model_args(m, weights=False)
    m.add_argument("--window", type=int, default=None, help="override the sliding window (teaching prompts)")
    m.add_argument("--image", action="append", default=[], help="image file (repeatable)")

    v = command("verify", "compare logits and greedy tokens with transformers (needs it installed)")
    _model_args(v)
    v.add_argument("--prompt", default="The capital of France is", help="the prompt both models run")
    v.add_argument("--tokens", type=int, default=16, help="greedy tokens to compare")

    c = command("convert", "convert a Gemma 3 GGUF file into a Hugging Face safetensors folder")
    c.add_argument("gguf", help="input .gguf file, or gemma-3-270m for the bundled one")
    c.add_argument("out_dir", help="output folder (config.json, model.safetensors, tokenizer.json)")

    i = command("info", "describe a model: sizes, layer pattern, windows, RoPE")
    _model_args(i)
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.command is None:
        ap.print_help()
        return 0
    try:
        return {"generate": _generate, "compare": _compare, "masks": _masks, "verify": _verify, "convert": _convert,
                "info": _info}[
            args.command
        ](args)
    except (Gemma3LabError, ValueError, OSError, ImportError) as e:  # bad input: one line, no traceback
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2


def _one_line(e: BaseException) -> str:
    """The message on one line (a config mismatch lists its tensors on indented lines)."""
    return "; ".join(part.strip() for part in str(e).splitlines() if part.strip()) or type(e).__name__


def _load(args):
    return load(args.model, dtype=args.dtype, device=args.device, quantize=args.quantize,
                group_size=DEFAULT if args.group_size is None else args.group_size)


def _generate(args) -> int:
    model = _load(args)
    print(f"[{model.describe()}]", file=sys.stderr)
    prompt = [{"role": "user", "content": args.prompt}] if args.chat else args.prompt

    def stream(step):
        if args.show_probs:
            alts = ", ".join(f"{t!r} {p:.2f}" for t, p in step.top_k[:3])
            print(f"{step.index:3d} {step.token!r:>16} p={step.prob:.3f}   top: {alts}")
        else:
            print(step.text, end="", flush=True)

    if args.compile:
        print(f"[{model.compile_decode(background=False).describe()}]", file=sys.stderr)
    res = model.generate(
        prompt, images=args.image or None, max_new_tokens=args.max_new_tokens, do_sample=args.sample,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
        on_token=stream, pan_and_scan=args.pan_and_scan, fast=False if args.plain else None,
    )
    if not args.show_probs:
        print()
    print(
        f"[{len(res.token_ids)} tokens, stop: {res.stop_reason}, prefill {res.prefill_seconds:.2f}s, "
        f"{res.tokens_per_second:.1f} tok/s, decode step: {res.decode_path}]",
        file=sys.stderr,
    )
    return 0


def _masks(args) -> int:
    AttentionMaskVisualizer(args.model, window=args.window)(args.prompt, images=args.image or None)
    return 0


def _compare(args) -> int:
    if args.tokens < 1:  # before two loads, not after
        raise Gemma3LabError(f"--tokens must be at least 1, not {args.tokens}")
    a, b = (load_precision(args.model, p, device=args.device) for p in (args.a, args.b))
    for label, m in (("A", a), ("B", b)):
        print(f"[{label}: {m.describe()}]", file=sys.stderr)
    labels = (args.a, args.b)
    d = greedy_divergence(a, b, args.prompt, args.tokens, labels)
    for label, ids in zip(labels, (d.a_ids, d.b_ids)):
        print(f"{label:>9}: {a.tokenizer.decode(ids)!r}")
    print(d.summary())
    print(compare(a, b, args.prompt, labels).summary())
    return 0


def _verify(args) -> int:
    from pathlib import Path

    model = _load(args)
    folder = Path(model.source)
    if folder.suffix == ".gguf":
        folder = cached_conversion(folder)
    ref = load_reference(folder, dtype=model.dtype)
    print(f"[{model.describe()}] vs transformers (eager) on {folder}")
    report = verify(model, ref, args.prompt, args.tokens)
    print(report)
    return 0 if report.greedy_agree else 1


def _convert(args) -> int:
    out = convert_gguf(bundled_gguf_path() if args.gguf == BUNDLED else args.gguf, args.out_dir)
    print(f"wrote {out}")
    return 0


def _info(args) -> int:
    model = _load(args)
    t = model.config.text
    print(model.describe())
    print(f"source: {model.source}")
    print(f"width {t.hidden_size}, MLP {t.intermediate_size}, heads {t.num_heads} (kv {t.num_kv_heads}), head dim {t.head_dim}")
    print(f"vocab {t.vocab_size}, sliding window {t.sliding_window}, attention scale {t.attn_scale:.6g}")
    print(f"global layers: {list(t.global_layers)}")
    print(f"RoPE local: {t.rope_local}   global: {t.rope_global}")
    if model.config.vision:
        print(f"vision: {model.config.vision}")
    return 0
