"""What the GPU benchmarks share: the Qwen-shaped model's command-line arguments and config,
and running each variant in a fresh process (so peak memory belongs to that variant alone)."""

from __future__ import annotations

import json
import subprocess
import sys


def add_shape_args(p) -> None:
    """The model shape (Qwen2.5-0.5B by default), its L2A window and routed density."""
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--hidden", type=int, default=896)
    p.add_argument("--intermediate", type=int, default=4864)
    p.add_argument("--heads", type=int, default=14)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--window", type=int, default=4096)
    p.add_argument("--density", type=float, default=0.2)
    p.add_argument("--dtype", default="bfloat16")


def qwen_shape(args, context: int, rope_theta: float = 1e6):
    """The ``ModelConfig`` of a Qwen2-family model with the shape ``args`` give."""
    from l2a_jax import ModelConfig, RopeConfig

    return ModelConfig(
        architecture="Qwen2ForCausalLM",
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_layers=args.layers,
        num_heads=args.heads,
        num_kv_heads=args.kv_heads,
        head_dim=args.head_dim,
        max_position_embeddings=context,
        qkv_bias=True,
        rope=RopeConfig(theta=rope_theta),
    )


def run_variants(args, run_variant, script: str, known, *, stem: str | None = None):
    """In a child process (``--one VARIANT``): measures that variant and prints its result
    line, returning None. Otherwise: runs every variant of ``args.variants`` in a child and
    returns (device kind, rows, the ``base`` row or None). With ``stem`` and ``args.out``, the
    rows so far are written (``write_results``) after each variant, so a run stopped part way
    (a time limit) keeps what it measured; the caller's final write replaces them."""
    if args.one is not None:
        print("RESULT " + json.dumps(run_variant(args)), flush=True)
        return None
    import jax

    device = jax.devices()[0].device_kind

    def keep(rows):
        if stem is not None:
            write_results(args.out, stem, device, args, rows)

    rows = run_in_fresh_processes(script, args.variants, known, on_row=keep)
    base = next((r for r in rows if r["variant"] == "base" and "error" not in r), None)
    return device, rows, base


def shape_line(args) -> str:
    """The model shape and L2A settings a table was measured with."""
    return (
        f"{args.layers} layers, hidden {args.hidden}, heads {args.heads}/{args.kv_heads}x"
        f"{args.head_dim}, vocab {args.vocab}, {args.dtype}, impl {args.impl}, window "
        f"{args.window}, density {args.density}"
    )


def run_in_fresh_processes(script: str, variants: str, known, on_row=None) -> list[dict]:
    """Runs ``script`` once per comma-separated variant with ``--one VARIANT`` (and this
    process's arguments); each child prints ``RESULT {json}``. A failed variant becomes a row
    with its error. ``on_row(rows)`` is called after each variant with the rows so far."""
    rows = []
    for variant in variants.split(","):
        if variant not in known:
            raise SystemExit(f"unknown variant {variant!r}; use one of {list(known)}")
        child = [sys.executable, script, *sys.argv[1:], "--one", variant]
        proc = subprocess.run(child, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n")
            rows.append({"variant": variant, "error": (proc.stderr or proc.stdout)[-500:]})
        else:
            rows.append(json.loads(lines[-1][len("RESULT ") :]))
            print(rows[-1], flush=True)
        if on_row is not None:
            on_row(rows)
    return rows


def write_results(out, stem: str, device: str, args, rows: list[dict]) -> None:
    """``out/{stem}-{device}-{date}.json`` (when ``out`` is set): device, JAX version, the
    arguments and the rows."""
    if out is None:
        return
    import datetime

    import jax

    out.mkdir(parents=True, exist_ok=True)
    day = datetime.date.today().isoformat()
    meta = {k: str(v) for k, v in vars(args).items() if k != "one"}
    record = {"device": device, "jax": jax.__version__, "args": meta, "rows": rows}
    path = out / f"{stem.format(device=device.replace(' ', '_'))}-{day}.json"
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps(record, indent=2))
    partial.replace(path)  # whole or not at all, should the run be stopped while writing
