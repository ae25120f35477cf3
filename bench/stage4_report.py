"""bench/RESULTS.md and a PNG chart from a stage-4 results JSON (bench/stage4_generate.py)."""

from __future__ import annotations

from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_MD = BENCH_DIR / "RESULTS.md"

# (label, numerator tool, denominator tool, figure, target, how to compare)
TARGETS = [
    ("slimgraph int4 decode / llama.cpp Q4_1 decode", "slimgraph-int4", "llama.cpp-q4_1", "decode_tokens_per_s", 1.0, ">="),
    ("slimgraph int4 with 8-bit activations decode / llama.cpp Q4_1 decode", "slimgraph-int4-a8",
     "llama.cpp-q4_1", "decode_tokens_per_s", 1.0, ">="),
    ("slimgraph in llama.cpp's formats (int4 g32, int8 LM head, 8-bit activations) decode / llama.cpp Q4_1 decode",
     "slimgraph-llama-cpp-formats", "llama.cpp-q4_1", "decode_tokens_per_s", 1.0, ">="),
    ("slimgraph int4 decode / ONNX Runtime fp32 decode", "slimgraph-int4", "ort-fp32", "decode_tokens_per_s", 2.0, ">="),
    ("slimgraph fp32 decode / ONNX Runtime fp32 decode", "slimgraph-fp32", "ort-fp32", "decode_tokens_per_s", 1.0, ">="),
    ("slimgraph fp32 prefill / ONNX Runtime fp32 prefill", "slimgraph-fp32", "ort-fp32", "prefill_ms", 1.0, "<="),
]


def _median(row: dict, key: str) -> float | None:
    return row.get(key, {}).get("median") if "not_run" not in row else None


def _cell(row: dict, key: str, fmt: str) -> str:
    if "not_run" in row:
        return "—"
    s = row[key]
    return f"{s['median']:{fmt}} ({s['min']:{fmt}}–{s['max']:{fmt}})"


def tool_table(data: dict) -> list[str]:
    lines = ["| tool | prefill T=128 ms (min–max) | decode tokens/s (min–max) | peak RSS MB | size MB | "
             "tokens equal to torch eager |", "|---|---|---|---|---|---|"]
    for tool, row in data["rows"].items():
        if "not_run" in row:
            lines.append(f"| {tool} | not run: {row['not_run']} | | | | |")
            continue
        same = row.get("same_tokens_as_torch")
        agreement = "—" if same is None else f"{same}/{data['new_tokens']}"
        lines.append(f"| {tool} | {_cell(row, 'prefill_ms', '.1f')} | {_cell(row, 'decode_tokens_per_s', '.1f')} | "
                     f"{row['peak_rss_mb']:.0f} | {row['size_mb']:.1f} | "
                     f"{agreement} |")
    return lines


def target_table(data: dict) -> list[str]:
    lines = ["| comparison | ratio | target | met |", "|---|---|---|---|"]
    rows = data["rows"]
    for label, num, den, key, target, how in TARGETS:
        a, b = _median(rows.get(num, {"not_run": 1}), key), _median(rows.get(den, {"not_run": 1}), key)
        if a is None or b is None:
            lines.append(f"| {label} | not measured | {how} {target} | — |")
            continue
        ratio = a / b
        met = ratio >= target if how == ">=" else ratio <= target
        lines.append(f"| {label} | {ratio:.2f}x | {how} {target} | {'yes' if met else 'no'} |")
    return lines


def memory_lines(data: dict) -> list[str]:
    out = []
    for tool, row in data["rows"].items():
        trace = row.get("decode_memory_mb")
        if trace:
            points = sorted((int(k), v) for k, v in trace.items())
            steps = ", ".join(f"{k}: {v:.1f}" for k, v in points)
            values = [v for _, v in points]
            out.append(f"- {tool}: resident MB after decode step {steps} (growth from step 64 to 512: "
                       f"{values[-1] - values[1]:+.1f} MB)")
    return out


GPU_TARGETS = [("slimgraph-fp16", 1.0), ("slimgraph-int4", 1.5)]   # decode tokens/s over torch.compile fp16


def gpu_lines() -> list[str]:
    """The newest ``bench/results/stage4-cuda-*.json`` (``bench/stage4_cuda.py measure`` on the GPU
    machine) as a table with its targets; nothing when no GPU run was recorded."""
    import json

    runs = sorted((BENCH_DIR / "results").glob("stage4-cuda-*.json"))
    if not runs:
        return []
    data = json.loads(runs[-1].read_text())
    rows = data["rows"]
    lines = [f"## SmolLM2-135M decoding on the GPU — {data['gpu']}, torch {data['torch']}, {data['date']}", "",
             f"From `{runs[-1].relative_to(BENCH_DIR.parent).as_posix()}` (`bench/stage4_cuda.py measure`): "
             f"a {data['prompt_tokens']}-token prompt, then {data['new_tokens']} greedy tokens; random weights of "
             "SmolLM2's shapes (speed does not depend on their values). Median of 3 runs (min–max).", "",
             "| tool | decode tokens/s (min–max) |", "|---|---|"]
    for tool, row in rows.items():
        lines.append(f"| {tool} | " + (f"not run: {row['not_run']}" if "not_run" in row
                                       else _cell(row, "decode_tokens_per_s", ".1f")) + " |")
    lines += ["", "| comparison | ratio | target | met |", "|---|---|---|---|"]
    base = _median(rows.get("torch-compile-fp16", {"not_run": 1}), "decode_tokens_per_s")
    for tool, target in GPU_TARGETS:
        ours = _median(rows.get(tool, {"not_run": 1}), "decode_tokens_per_s")
        label = f"{tool} decode / torch.compile fp16 decode"
        if ours is None or base is None:
            lines.append(f"| {label} | not measured | >= {target} | — |")
        else:
            lines.append(f"| {label} | {ours / base:.2f}x | >= {target} | {'yes' if ours / base >= target else 'no'} |")
    return lines + [""]


def write_markdown(data: dict, source: Path) -> Path:
    m = data["machine"]
    versions = ", ".join(f"{k} {v}" for k, v in sorted(m["versions"].items()))
    lines = [
        "# slimgraph benchmark results",
        "",
        "Generated by `python bench/stage4_generate.py measure` (do not edit by hand; "
        f"`python bench/stage4_generate.py report {source.relative_to(BENCH_DIR.parent)}` rebuilds it).",
        "",
        f"## SmolLM2-135M generation — {m['cpu']}, {data['threads']} threads, {data['date']}",
        "",
        f"Versions: {versions}. Python {m['python']}, {m['cores']} cores.",
        "",
        f"Work per run: a {data['prompt_tokens']}-token prompt (prefill, KV cache filled), then greedy decoding of "
        f"{data['new_tokens']} tokens (end-of-sequence ignored); decode tokens/s counts tokens 2..{data['new_tokens']}. "
        "Median of 3 runs after two warm-ups (min–max). Each tool runs in its own process; peak RSS is that "
        "process's maximum resident memory.",
        "",
        *tool_table(data),
        "",
        "### Targets",
        "",
        *target_table(data),
        "",
        "### Decode memory over 512 tokens",
        "",
        *(memory_lines(data) or ["- not measured"]),
        "",
        f"![chart]({source.with_suffix('.png').relative_to(BENCH_DIR).as_posix()})",
        "",
        *gpu_lines(),
    ]
    RESULTS_MD.write_text("\n".join(lines))
    return RESULTS_MD


def write_chart(data: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {t: r for t, r in data["rows"].items() if "not_run" not in r}
    names = list(rows)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, (key, title) in zip(axes, [("decode_tokens_per_s", "decode tokens/s (higher is better)"),
                                       ("prefill_ms", "prefill T=128 ms (lower is better)")]):
        values = [rows[n][key]["median"] for n in names]
        ax.barh(names, values, color=["#2b8cbe" if n.startswith("slimgraph") else "#bdbdbd" for n in names])
        ax.set_title(title)
        ax.invert_yaxis()
    axes[2].barh(names, [rows[n]["peak_rss_mb"] for n in names], color="#a1d99b")
    axes[2].set_title("peak resident memory MB")
    axes[2].invert_yaxis()
    fig.suptitle(f"SmolLM2-135M, {data['machine']['cpu']}, {data['threads']} threads, {data['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
