"""Markdown tables for docs/benchmarks.md, from the JSON files the benchmarks write.

Each table lives between `<!-- bench:NAME -->` and `<!-- /bench:NAME -->` markers; `update_docs`
replaces only the sections it is given, so a run without UER-py (or without --soak) leaves the
recorded UER-py and soak tables as they were.
"""

from __future__ import annotations

import re
from pathlib import Path


def _k(value) -> str:
    if value is None:
        return "n/a"
    return f"{value / 1000:,.0f}k" if value >= 10_000 else f"{value:,.0f}"


def _x(value) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def _f(value, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _mb(value) -> str:
    return "n/a" if value is None else f"{value:,.0f}"


def stamp(meta: dict) -> str:
    machine = meta["machine"]
    load = meta.get("foreign_load")
    return (f"_Recorded {meta['finished']} with `{meta['command']}`, cpt {machine['cpt_revision']}"
            f"{' + uncommitted changes' if machine['cpt_dirty'] else ''}"
            f"{f'; other processes kept {load} cores busy on average' if load is not None else ''}._")


def render_machine(meta: dict) -> str:
    machine = meta["machine"]
    versions = ", ".join(f"{name} {version}" for name, version in machine["versions"].items() if version)
    flags = f" ({machine['cpu_flags']})" if machine.get("cpu_flags") else ""
    lines = [
        "| | |",
        "|---|---|",
        f"| CPU | {machine['nproc']} x {machine['cpu_model']}{flags} |",
        f"| memory | {machine['memory_gb']} GB |",
        f"| OS | {machine['platform']} |",
        f"| Python | {machine['python']} |",
        f"| packages | {versions} |",
        f"| cpt | {machine['cpt_revision']}{' + uncommitted changes' if machine['cpt_dirty'] else ''} |",
    ]
    if machine.get("uer_py_revision"):
        lines.append(f"| UER-py | {machine['uer_py_revision']} (run from a local checkout, not vendored) |")
    lines.append(f"| last run | {meta['finished']}: `{meta['command']}` |")
    return "\n".join(lines)


def render_data(data: dict) -> str:
    s = data["summary"]
    rows = [row for row in data["cpt"] if "error" not in row]
    lines = [
        f"Input: `{Path(data['settings']['corpus']).name}`, {data['settings']['chars']:,} characters, "
        f"`--max-seq-length {data['settings']['max_seq_length']} --workers {data['settings']['workers']}`, "
        f"tiny base (vocab 21128). Medians of {len(rows)} runs.",
        "",
        "| measure | cpt prepare | cpt tokenize | prepare + tokenize |",
        "|---|---|---|---|",
    ]
    if rows:
        def med(key, stage):
            values = sorted(row[stage][key] for row in rows)
            return values[len(values) // 2]

        both = sorted(row["prepare_tokenize_chars_per_s"] for row in rows)[len(rows) // 2]
        both_cpu = sorted(row["prepare_tokenize_chars_per_cpu_s"] for row in rows)[len(rows) // 2]
        lines += [
            f"| chars/s (wall) | {_k(med('chars_per_s', 'prepare'))} | {_k(med('chars_per_s', 'tokenize'))} | {_k(both)} |",
            f"| chars per CPU-second (whole process tree) | {_k(med('chars_per_cpu_s', 'prepare'))} | "
            f"{_k(med('chars_per_cpu_s', 'tokenize'))} | {_k(both_cpu)} |",
            f"| wall s | {_f(med('wall_s', 'prepare'))} | {_f(med('wall_s', 'tokenize'))} | |",
            f"| peak RSS of the tree, MB (sum over processes) | {_mb(max(r['prepare']['peak_rss_mb'] for r in rows))} | "
            f"{_mb(max(r['tokenize']['peak_rss_mb'] for r in rows))} | |",
            f"| peak PSS of the tree, MB (shared pages split) | {_mb(max(r['prepare']['peak_pss_mb'] for r in rows))} | "
            f"{_mb(max(r['tokenize']['peak_pss_mb'] for r in rows))} | |",
            f"| largest single process RSS, MB | {_mb(max(r['prepare']['peak_rss_single_mb'] for r in rows))} | "
            f"{_mb(max(r['tokenize']['peak_rss_single_mb'] for r in rows))} | |",
        ]
        first = rows[0]
        lines += [
            "",
            f"Shards on disk: {first['shard_bytes']:,} bytes = **{s['cpt_shard_bytes_per_char']:.2f} bytes per input "
            f"character** ({first['sequences']:,} sequences, {first['tokens']:,} tokens, "
            f"{first['chunks']['train']} train chunk(s) + {first['chunks']['val']} val)."
        ]
    fixed = data.get("fixed_cost", {}).get("cpt")
    if fixed and "error" not in fixed:
        lines += [
            "",
            f"Fixed cost (the same two commands on 20 documents, {data['fixed_cost']['chars']:,} chars): prepare "
            f"{fixed['prepare']['wall_s']:.1f} s wall / {fixed['prepare']['cpu_s']:.1f} CPU-s, tokenize "
            f"{fixed['tokenize']['wall_s']:.1f} s wall / {fixed['tokenize']['cpu_s']:.1f} CPU-s "
            f"(peak RSS {fixed['tokenize']['peak_rss_mb']:.0f} MB): start-up, not throughput.",
        ]
    errors = [row["error"] for row in data["cpt"] if "error" in row]
    if errors:
        lines += ["", "Failed runs: " + "; ".join(errors)]
    return "\n".join(lines)


def render_scaling(data: dict) -> str:
    rows = data.get("scaling", [])
    if not rows:
        return "_No synthetic sizes in this run (--synthetic-mb)._"
    lines = [
        "Synthetic corpora built from the same file (`bench/synth.py`: sentences rotated per copy, so `prepare` "
        "keeps every line). Memory must not grow with the input.",
        "",
        "| input | chars | tokenize chars/s | tokenize chars/CPU-s | prepare+tokenize chars/s | peak RSS tree MB "
        "| peak PSS tree MB | largest process MB | shards bytes/char | chunks |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['size_mb']:g} MiB | {row.get('chars', 'n/a')} | {row['error']} |||||||| ")
            continue
        lines.append(
            f"| {row['size_mb']:g} MiB | {row['chars'] / 1e6:.1f}M | {_k(row['tokenize']['chars_per_s'])} | "
            f"{_k(row['tokenize']['chars_per_cpu_s'])} | {_k(row['prepare_tokenize_chars_per_s'])} | "
            f"{_mb(row['peak_rss_mb'])} | {_mb(row['peak_pss_mb'])} | "
            f"{_mb(max(row['prepare']['peak_rss_single_mb'], row['tokenize']['peak_rss_single_mb']))} | "
            f"{row['shard_bytes_per_char']:.2f} | {row['chunks']['train']} |"
        )
    return "\n".join(lines)


def render_uer_data(data: dict) -> str:
    s = data["summary"]
    if "uer_dup5_chars_per_s" not in s and "uer_dup1_chars_per_s" not in s:
        return "_UER-py was not run (pass --uer-path)._"
    lines = [
        "Same file, same 2 processes, `--seq_length 128 --whole_word_masking --span_masking --data_processor mlm`. "
        "UER-py's preprocess tokenizes *and* masks (static masks, one copy per dup_factor); cpt tokenize writes "
        "unmasked ids + word-start flags and masks on the fly in training. The cpt column is both stages, "
        "`cpt prepare` + `cpt tokenize` (start-up of each included), against UER-py's one preprocess.py.",
        "",
        "| measure | cpt prepare + tokenize | UER-py dup_factor 5 | UER-py dup_factor 1 | target |",
        "|---|---|---|---|---|",
        f"| chars/s (wall) | {_k(s['cpt_prepare_tokenize_chars_per_s'])} | {_k(s.get('uer_dup5_chars_per_s'))} | "
        f"{_k(s.get('uer_dup1_chars_per_s'))} | |",
        f"| cpt speed-up (wall) | | **{_x(s.get('speed_ratio_vs_uer_dup5'))}** | **{_x(s.get('speed_ratio_vs_uer_dup1'))}** "
        f"| >= 10x (dup 5), >= 3x (dup 1) |",
        f"| chars per CPU-second | {_k(s.get('cpt_prepare_tokenize_chars_per_cpu_s'))} | "
        f"{_k(s.get('uer_dup5_chars_per_cpu_s'))} | "
        f"{_k(s.get('uer_dup1_chars_per_cpu_s'))} | |",
        f"| cpt speed-up (CPU time) | | {_x(s.get('cpu_speed_ratio_vs_uer_dup5'))} | "
        f"{_x(s.get('cpu_speed_ratio_vs_uer_dup1'))} | |",
        f"| bytes on disk per input char | {_f(s['cpt_shard_bytes_per_char'])} | "
        f"{_f(s.get('uer_dup5_dataset_bytes_per_char'))} | {_f(s.get('uer_dup1_dataset_bytes_per_char'))} | |",
        f"| UER-py bytes / cpt bytes | | **{_x(s.get('disk_ratio_uer_dup5_over_cpt'))}** | "
        f"{_x(s.get('disk_ratio_uer_dup1_over_cpt'))} | >= 10x (cpt <= 1/10) |",
        f"| peak RSS of the tree, MB | {_mb(s['cpt_peak_rss_mb'])} | {_mb(s.get('uer_dup5_peak_rss_mb'))} | "
        f"{_mb(s.get('uer_dup1_peak_rss_mb'))} | |",
    ]
    fixed = data.get("fixed_cost", {})
    if "uer_dup1" in fixed and "error" not in fixed["uer_dup1"] and "error" not in fixed.get("cpt", {"error": 1}):
        lines += ["", f"Fixed cost on 20 documents: cpt tokenize {fixed['cpt']['tokenize']['wall_s']:.1f} s, UER-py "
                      f"preprocess {fixed['uer_dup1']['wall_s']:.1f} s (jieba dictionary load in each worker)."]
    runs = len([r for r in data["uer_dup1"] if "error" not in r])
    lines += ["", f"Runs interleaved on one machine: cpt x{len(data['cpt'])}, UER-py dup 1 x{runs}, dup 5 x"
                  f"{len([r for r in data['uer_dup5'] if 'error' not in r])}; medians."]
    return "\n".join(lines)


def render_uer_scaling(data: dict) -> str:
    lines = [
        "The same comparison on a larger synthetic input (`bench/synth.py`), where start-up no longer dominates "
        "(UER-py dup_factor 1 only: dup_factor 5 takes about 5 times as long).",
        "",
        "| input | cpt prepare + tokenize chars/s | UER-py dup 1 chars/s | cpt speed-up (wall) | speed-up (CPU time) "
        "| cpt bytes/char | UER-py dup 1 bytes/char |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in data["uer_scaling"]:
        cpt, uer = row["cpt"], row["uer_dup1"]
        if "error" in cpt or "error" in uer:
            lines.append(f"| {row['size_mb']:g} MiB | {cpt.get('error', '')} {uer.get('error', '')} ||||||")
            continue
        lines.append(f"| {row['size_mb']:g} MiB ({row['chars'] / 1e6:.1f}M chars) | {_k(cpt['prepare_tokenize_chars_per_s'])} | "
                     f"{_k(uer['chars_per_s'])} | **{_x(row['speed_ratio'])}** | {_x(row['cpu_speed_ratio'])} | "
                     f"{cpt['shard_bytes_per_char']:.2f} | {uer['dataset_bytes_per_char']:.2f} |")
    return "\n".join(lines)


def _variants(train: dict) -> list[str]:
    return [tool for tool in train["rounds"][0] if tool.startswith("cpt ")] if train.get("rounds") else []


def _tool_name(tool: str) -> str:
    names = {"cpt": "cpt train", "hf_trainer": "HF Trainer (`hf_trainer_mlm.py`)", "uer": "UER-py pretrain.py"}
    return names.get(tool) or f"cpt train `{tool.removeprefix('cpt ')}`"


def _train_rows(train: dict, tools: list[str]) -> list[str]:
    s = train["summary"]
    lines = ["| tool | s/step (median) | s/step (p10) | steps/s | tokens/s | CPU-s/step | peak RSS MB |",
             "|---|---|---|---|---|---|---|"]
    for tool in tools:
        if tool not in s:
            errors = [r[tool]["error"] for r in train["rounds"] if tool in r and "error" in r[tool]]
            lines.append(f"| {_tool_name(tool)} | {'failed: ' + errors[0] if errors else 'not run'} ||||||")
            continue
        t = s[tool]
        lines.append(f"| {_tool_name(tool)} | {_f(t['s_per_step'], 3)} | {_f(t['p10_s_per_step'], 3)} | "
                     f"{_f(t['steps_per_s'], 3)} | {_k(t['tokens_per_s'])} | {_f(t['cpu_s_per_step'], 3)} | "
                     f"{_mb(t['peak_rss_mb'])} |")
    return lines


def _speedup_line(train: dict, other: str, label: str, target: str, ours: str = "cpt") -> str:
    ratio = train["summary"].get(f"cpt_speedup_vs_{other}" if ours == "cpt" else f"{ours} speedup vs {other}")
    name = "cpt" if ours == "cpt" else f"cpt `{ours.removeprefix('cpt ')}`"
    if not ratio:
        return f"| {name} vs {label} | n/a | n/a | n/a | {target} |"
    return (f"| {name} vs {label} | **{_x(ratio['median'])}** ({', '.join(_x(x) for x in ratio['median_per_round'])}) | "
            f"{_x(ratio['p10'])} | **{_x(ratio['cpu'])}** ({', '.join(_x(x) for x in ratio['cpu_per_round'])}) "
            f"| {target} |")


def render_train(train: dict) -> str:
    st = train["settings"]
    lines = [
        f"BERT {st['layers']} layers / hidden {st['hidden']} / {st['heads']} heads / FFN {st['intermediate']}, vocab "
        f"{st['vocab']}; micro-batch {st['micro_batch_size']} = global batch {st['global_batch_size']}, sequences of "
        f"{st['seq_length']}; {st['steps']} steps per run, the first {st['warmup_steps_skipped']} skipped; "
        f"{st['rounds']} interleaved rounds; threads per process: {st['threads']}.",
        "",
        *_train_rows(train, ["cpt", *_variants(train), "hf_trainer"]),
        "",
        "| ratio (> 1 = cpt faster) | steps/s, median s/step (per round) | p10 s/step | CPU-s/step (per round) | target |",
        "|---|---|---|---|---|",
        _speedup_line(train, "hf_trainer", "HF Trainer", "faster"),
        *(_speedup_line(train, "hf_trainer", "HF Trainer", "", ours=variant) for variant in _variants(train)),
        # --cpt-tree rows: this checkout against an older one, the same rounds (no regression: >= 1 within noise)
        *(_speedup_line(train, tree, f"cpt `{tree.removeprefix('cpt ')}`", "no regression")
          for tree in _variants(train) if tree.startswith("cpt @")),
    ]
    return "\n".join(lines)


def render_uer_train(train: dict) -> str:
    if "uer" not in train["summary"] and not any("uer" in r for r in train["rounds"]):
        return "_UER-py was not run (pass --uer-path)._"
    return "\n".join([
        "cpt and UER-py rows come from the same interleaved rounds (cpt, HF, UER-py; run stamped above). UER-py "
        "trains on its own dataset.pt (dup_factor 1, static whole-word + span masks, 128-token instances); its "
        "tokens/s counts padding.",
        "",
        *_train_rows(train, ["cpt", *_variants(train), "uer"]),
        "",
        "| ratio (> 1 = cpt faster) | steps/s, median s/step (per round) | p10 s/step | CPU-s/step (per round) | target |",
        "|---|---|---|---|---|",
        _speedup_line(train, "uer", "UER-py", ">= 2x steps/s"),
        *(_speedup_line(train, "uer", "UER-py", "", ours=variant) for variant in _variants(train)),
    ])


def render_loader(loader: dict) -> str:
    rows = ["| seq | us / sequence | real tokens/s, one process (best / median round) | BERT-large needs at 50 % MFU "
            "| headroom, one process |", "|---|---|---|---|---|"]
    for row in loader["rows"]:
        rows.append(f"| {row['seq_length']} | {row['us_per_sequence']:.0f} | {_k(row['real_tokens_per_s'])} / "
                    f"{_k(row['real_tokens_per_s_median'])} | {_k(row['gpu_needs_tokens_per_s'])} | {_x(row['headroom'])} |")
    rows += ["", "| sampler: pick a global batch of 256 | order drawn every step (before) | cached per epoch (now) |",
             "|---|---|---|"]
    for row in loader["sampler"]:
        rows.append(f"| {row['num_sequences']:,} sequences | {row['ms_per_step_drawn_each_step']:.1f} ms/step | "
                    f"{row['ms_per_step_cached']:.2f} ms/step |")
    return "\n".join(rows)


def render_soak(soak: dict) -> str:
    if "error" in soak:
        return f"Soak run failed: {soak['error']}"
    rss = soak["rss"]
    st = soak["settings"]
    lines = [
        f"`cpt train`, {st['model']}, {st['steps']} steps of {st['batch_size']} x {st['seq_length']}, eval every "
        f"{st['eval_interval']}, checkpoint every {st['save_interval']}, threads {st['threads']}; RSS sampled every "
        f"0.5 s ({soak['steps_per_s']} steps/s wall).",
        "",
        "| RSS at 10 % | at 50 % | at 100 % | peak | growth 10 % -> 100 % | growth 50 % -> 100 % "
        "| flat (2nd half <= 2 %) |",
        "|---|---|---|---|---|---|---|",
        f"| {_mb(rss['at_10pct_mb'])} MB | {_mb(rss['at_50pct_mb'])} MB | {_mb(rss['at_100pct_mb'])} MB | "
        f"{_mb(rss['peak_mb'])} MB | {rss['growth_after_10pct']:+.1%} | {rss['growth_second_half']:+.1%} | "
        f"{'yes' if rss['flat'] else '**no**'} |",
    ]
    steps = [point for point in rss.get("timeline", []) if point["step"]]
    if steps:
        plateau = next((point for point in steps if point["rss_mb"] >= 0.99 * rss["at_100pct_mb"]), None)
        if plateau:
            lines += ["", f"RSS reached 99 % of its final value at step {plateau['step']} of {st['steps']} "
                          f"({plateau['rss_mb']:.0f} MB) and stayed there."]
    return "\n".join(lines)


def render_profile(profile: dict) -> str:
    if "error" in profile:
        return f"Profile not taken: {profile['error']}"
    lines = [
        f"py-spy at {profile['settings']['rate_hz']} Hz over `cpt train` ({profile['settings']['shape']}, "
        f"{profile['settings']['steps']} steps incl. start-up), main thread, share of samples:",
        "",
        "| phase | share |",
        "|---|---|",
    ]
    lines += [f"| {phase} | {share:.1%} |" for phase, share in profile["main_thread_share"].items()]
    main_samples = sum(profile["threads"].get("main", {}).values()) or 1
    for name, counter in profile["threads"].items():
        if name == "main" or not counter:
            continue
        top = max(counter, key=counter.get)
        lines += ["", f"Another thread ({name}) was busy for {sum(counter.values()) / main_samples:.1%} of the main "
                      f"thread's samples, mostly in: {top}."]
    return "\n".join(lines)


def update_docs(path: Path, sections: dict[str, str]) -> None:
    """Replace the body of each named marker section (appending the section if its markers are missing)."""
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    for name, body in sections.items():
        pattern = re.compile(rf"(<!-- bench:{name} -->\n)(.*?)(<!-- /bench:{name} -->)", re.S)
        block = f"<!-- bench:{name} -->\n{body.rstrip()}\n<!-- /bench:{name} -->"
        match = pattern.search(text)
        if match:
            text = text[: match.start()] + block + text[match.end() :]
        else:
            text = text.rstrip() + f"\n\n{block}\n"
    path.write_text(text.rstrip() + "\n", encoding="utf-8")
