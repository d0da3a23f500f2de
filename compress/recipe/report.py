"""The files a person reads after a recipe run: report.json, report.md, pareto.png and bits.png (each atomic)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..atomic import write_text
from ..output import markdown_table, save_figure
from .variants import Variant


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.2f}"


def _ms(check: dict[str, Any] | None, batch: int, key: str = "latency_ms") -> str:
    value = (check or {}).get(key, {}).get(str(batch))
    return "–" if value is None else f"{value:.2f}"


def rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per variant: torch-side accuracy, ONNX-side size/latency/accuracy where the variant was exported."""
    out = []
    variants, checks, files = report["variants"], report["checks"], report["files"]
    for key in Variant:
        if key not in variants and key not in checks:
            continue
        v = variants.get(key, {})
        ch = checks.get(key)
        top1 = ch["top1"] if ch and ch.get("top1") is not None else v.get("top1")
        agree = ch["dense_agreement"] if ch and ch.get("dense_agreement") is not None else v.get("dense_agreement")
        out.append({"variant": key.value, "label": key.label, "top1": top1, "dense_agreement": agree,
                    "macs": v.get("macs", report["final"]["macs"]), "params": v.get("params", report["final"]["params"]),
                    "size_bytes": files.get(key, {}).get("size_bytes"), "latency_b1": _ms(ch, 1),
                    "latency_b32": _ms(ch, 32), "default_b1": _ms(ch, 1, "default_latency_ms"),
                    "default_b32": _ms(ch, 32, "default_latency_ms"), "openvino_b1": _ms(ch, 1, "openvino_latency_ms"),
                    "openvino_b32": _ms(ch, 32, "openvino_latency_ms"), "onnx": files.get(key, {}).get("path")})
    return out


def _deploy_line(report: dict[str, Any]) -> str:
    """Which file model.onnx is, and its default-session latency against the dense model's."""
    deploy = report["deploy"]
    ms = {k: report["checks"].get(k, {}).get("default_latency_ms", {}).get("1")
          for k in (deploy["variant"], Variant.DENSE)}
    timing = (f": {ms[deploy['variant']]:.3f} ms at batch 1 in a default session, dense {ms[Variant.DENSE]:.3f} ms"
              if None not in ms.values() else "")
    if None not in ms.values() and ms[deploy["variant"]] > ms[Variant.DENSE]:
        why = (": in a model this small the int8 quantize and dequantize steps cost more than they save"
               if deploy["variant"] == Variant.INT8 else "")
        timing += f" (slower than the dense model at batch 1{why}; the latency columns show the faster file)"
    same = "" if deploy["same_as"] == deploy["path"] else f" (the same file as `{deploy['same_as']}`)"
    return (f"`{deploy['path']}` is the file to deploy{same}; it needs no session option to run on the "
            f"CPU{timing}. "
            "The size-optimised `model_small.onnx` (packed weights) wants `session.disable_quant_qdq=1` "
            "(`exporters.open_session` sets it).")


def markdown(report: dict[str, Any]) -> str:
    verdict = report["verdict"]
    lines = [f"# Recipe `{report['recipe']}`: **{'PASS' if verdict['passed'] else 'FAIL'}**", ""]
    if report["timing_only"]:
        lines += ["> **TIMING ONLY**: synthetic data or random weights. Every accuracy below is meaningless; only "
                  "sizes, MACs and latencies are real.", ""]
    lines += [report["description"].strip(), "", f"Data: {report['data']['description']}, "
              f"{report['data']['evaluation_samples']} evaluation samples (ONNX files and the quantized model: "
              f"{next(iter(report['checks'].values()))['num_samples']}). Seed {report['seed']}, device "
              f"{report['device']}. Latency: onnxruntime CPU, median ms per batch, "
              f"{next(iter(report['checks'].values()))['threads']} threads.", ""]
    table = []
    dense_lat = rows(report)[0]["latency_b1"]
    openvino = any(r["openvino_b1"] != "–" for r in rows(report))
    for row in rows(report):
        size = "–" if row["size_bytes"] is None else f"{row['size_bytes'] / 1e6:.2f}"
        speedup = "–"
        if row["latency_b1"] != "–" and dense_lat != "–":
            speedup = f"{float(dense_lat) / float(row['latency_b1']):.2f}x"
        table.append([row["label"], _pct(row["top1"]), _pct(row["dense_agreement"]), f"{row['macs'] / 1e6:.2f}",
                      f"{row['params'] / 1e6:.3f}", size, row["latency_b1"], row["latency_b32"], speedup,
                      row["default_b1"], row["default_b32"]] + [row["openvino_b1"], row["openvino_b32"]] * openvino)
    lines += [markdown_table(["variant", "top-1 %", "agreement with dense %", "MMACs", "M params", "ONNX MB",
                              "latency b1 ms", "latency b32 ms", "speed-up b1", "default session b1 ms",
                              "default session b32 ms"] + ["OpenVINO b1 ms", "OpenVINO b32 ms"] * openvino, table),
              "Latency columns: onnxruntime with the options `exporters.check.open_session` applies (weight-only "
              "packed files: `session.disable_quant_qdq=1`, so the weights are dequantized once at load); the "
              "default-session columns: the same file in a session with no options, as a deployment that sets none "
              "runs it.", "", _deploy_line(report), ""]
    lines += ["## Checks", ""]
    if verdict["failures"]:
        lines += [f"- FAIL: {f}" for f in verdict["failures"]]
    else:
        lines += ["- all thresholds met"]
    lines += [f"- not checked: {s}" for s in verdict["skipped"]]
    c = report["config"]["check"]
    lines += [f"- thresholds: parity ≤ {c['parity_rtol']} relative, agreement with source ≥ {c['min_agreement']}, "
              f"top-1 drop ≤ {c['max_top1_drop']} points, agreement with dense ≥ {c['min_dense_agreement']}, "
              f"latency b1 ≤ {c['max_latency_ms']} ms (None: not checked)", ""]
    for key, ch in report["checks"].items():
        rel = "–" if ch["rel_diff"] is None else f"{ch['rel_diff']:.1e}"
        lines.append(f"- `{ch['path'].split('/')[-1] if key != Variant.DENSE else 'dense fp32 (not kept)'}`: agreement with "
                     f"its source {_pct(ch['reference_agreement'])}%, relative diff {rel}"
                     f"{'' if ch['parity_checked'] else ' (parity not checked)'}")
    prune = report["prune"]
    if prune["enabled"]:
        lines += ["", "## Pruning", "", f"Criterion `{prune['criterion']}`, target {prune['target']} = "
                  f"{prune['fraction']}, reached MACs {prune['macs_ratio']:.3f} / params {prune['params_ratio']:.3f} "
                  f"in {prune['steps']} steps ({prune['seconds']:.1f} s). Never pruned: the classifier"
                  f"{', ' + ', '.join(prune['ignored_layers']) if prune['ignored_layers'] else ''}.", ""]
        changed = [[l["name"], l["before"], l["after"]] for l in prune["layers"] if l["before"] != l["after"]]
        lines += [markdown_table(["layer", "channels before", "after"], changed) if changed else "No channel removed."]
    plan = report["plan"]
    if plan:
        lines += ["", "## Bit plan", "", f"Allocator `{plan['allocator']}`, budget "
                  f"{', '.join(f'{k}={v}' for k, v in plan['budget'].items() if k in ('avg_bits', 'bytes', 'bops') and v)}, average "
                  f"{plan['avg_bits']:.2f} bits over the layers it chose for ({plan['avg_bits_all']:.2f} over all), "
                  f"predicted TPV {plan['predicted_tpv']:.4g}.", ""]
        int8 = report["checks"].get(Variant.INT8)
        if plan.get("predicted_latency_ms") is not None:
            measured = (int8 or {}).get("latency_ms", {}).get("1")
            lines += [f"Latency budget: the per-layer table predicts {plan['predicted_latency_ms']:.3f} ms for the int8 "
                      f"QDQ file at batch 1" + (f"; measured {measured:.3f} ms (measured / predicted = "
                                                f"{measured / plan['predicted_latency_ms']:.2f}; below 1: each layer's "
                                                "timing includes onnxruntime's per-run overhead, paid once by the whole "
                                                "file; above 1: the ops between layers are not in the table)."
                                                if measured else "; no int8 file exported."), ""]
        lines += [markdown_table(["layer", "bits", "weights", "predicted TPV", "note"],
                                 [[n, "float" if l["bits"] == 16 else l["bits"], l["numel"], f"{l['predicted_tpv']:.3g}",
                                   l["note"]] for n, l in plan["layers"].items()])]
    constrained = {n: l["note"] for n, l in (plan or {}).get("layers", {}).items() if l["note"]}
    for f in report["files"].values():
        if f["weights"] == "packed":
            constrained.update({n: r for n, r in f["float_layers"].items() if n not in constrained})
    unreadable = report["data"].get("unreadable_images", [])
    if unreadable:
        lines += ["", f"## Unreadable images skipped ({len(unreadable)})", ""]
        lines += [f"- `{path}`: {reason}" for path, reason in unreadable]
    lines += ["", "## Skipped or constrained layers", ""]
    lines += [f"- `{n}`: {r}" for n, r in constrained.items()] or ["- none"]
    lines += ["", "## Stage timings (s)", "", markdown_table(["stage", "seconds"],
                                                            [[k, f"{v:.1f}"] for k, v in report["stage_seconds"].items()])]
    onnx_files = [f["path"] for k, f in report["files"].items() if k != Variant.DENSE]
    onnx_files += [report["deploy"]["path"]] * (report["deploy"]["path"] not in onnx_files)
    lines += ["Files: " + ", ".join(f"`{name}`" for name in onnx_files) + ", `pruned.pt`"
              + (", `quantized.pt`" if plan else "") + " (load with `compress.load`), `report.json`, "
              "`pareto.png`, `bits.png`.", ""]
    versions = ", ".join(f"{k} {v}" for k, v in report["versions"].items())
    lines += [f"Versions: {versions}.", ""]
    return "\n".join(lines)


def _plot_pareto(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    metric = "top1" if not report["timing_only"] and report["data"]["labelled"] else "dense_agreement"
    points = [r for r in rows(report) if r["size_bytes"] is not None and r[metric] is not None]
    for r in points:
        ax.scatter(r["size_bytes"] / 1e6, 100 * r[metric], s=40)
        ax.annotate(r["label"], (r["size_bytes"] / 1e6, 100 * r[metric]), fontsize=7, xytext=(4, 4),
                    textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("ONNX file size (MB, log)")
    ax.set_ylabel("top-1 %" if metric == "top1" else "agreement with dense %")
    title = f"{report['recipe']}: accuracy vs size"
    ax.set_title(title + (" (TIMING ONLY: accuracy meaningless)" if report["timing_only"] else ""), fontsize=9)
    ax.grid(alpha=0.3)
    save_figure(fig, path)
    plt.close(fig)


def _plot_bits(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plan = report["plan"]
    names = list(plan["layers"]) if plan else []
    fig, ax = plt.subplots(figsize=(max(6, 0.25 * len(names)), 4))
    if plan:
        bits = [plan["layers"][n]["bits"] for n in names]
        colours = ["tab:grey" if plan["layers"][n]["note"] else "tab:blue" for n in names]
        ax.bar(range(len(names)), bits, color=colours)
        ax.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
        ax.set_ylabel("bits (16 = kept in float; grey = constrained)")
        ax.set_title(f"{report['recipe']}: {plan['allocator']} bit plan, avg {plan['avg_bits']:.2f} bits", fontsize=9)
    else:
        ax.text(0.5, 0.5, "quantization disabled in this recipe", ha="center", va="center")
        ax.set_axis_off()
    save_figure(fig, path)
    plt.close(fig)


def write(report: dict[str, Any], folder: Path) -> None:
    """Write the four report files into ``folder``."""
    write_text(folder / "report.json", json.dumps(report, indent=2, default=str))
    write_text(folder / "report.md", markdown(report))
    _plot_pareto(report, folder / "pareto.png")
    _plot_bits(report, folder / "bits.png")
