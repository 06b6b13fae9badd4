"""Can the loader feed a GPU? Batch building (sampling, dynamic WWM + span masking, padding) vs what
BERT-large consumes at 50 % MFU, and the per-step cost of the sampler on large corpora.

    python bench/loader_bench.py [--corpus ../shared/data/clue_small_2500.txt] [--out bench/out/loader.json]

Times `StepBatching.build` (what each loader process runs per step, cpt/training/batches.py) on one thread over
the corpus at seq 128 and 512 with the default masking (wwm+span), against the real tokens/s that
BERT-large (the real base's config) needs at 50 % MFU on an H100/H200 (989e12 dense bf16 FLOP/s;
FLOPs per token as in bench/gpu_bench.py). `headroom` = one process's tokens/s over that need;
`cpt train` runs 2 loader processes per GPU by default (--loader-workers).
Then the sampler alone (picking a global batch of 256) on 0.1M-2.6M sequences, with the epoch's
order drawn at every step (as before it was cached) and cached, side by side.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_bench import PEAK_FLOPS, flops_per_token  # noqa: E402
from harness import REPO, SHARED, machine_info, write_json  # noqa: E402

TARGET_MFU = 0.5


def bert_large_non_embedding_params() -> int:
    """Parameters of BertForMaskedLM on the real base's config, less the embeddings (meta device: no memory)."""
    import torch
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig.from_json_file(REPO / "cpt" / "assets" / "roberta_wwm_ext_large_config.json")
    with torch.device("meta"):
        model = BertForMaskedLM(config)
    return sum(p.numel() for name, p in model.named_parameters() if "embeddings" not in name)


def tokens_per_s_needed(seq: int, non_embedding: int) -> float:
    return TARGET_MFU * PEAK_FLOPS / flops_per_token(24, 1024, seq, non_embedding)


def time_step_batching(run_dir: Path, base: Path, seq: int, global_batch: int, rounds: int) -> dict:
    import torch

    from cpt.common.base_model import load_tokenizer
    from cpt.training.batches import SamplerState, StepBatching, masking_spec_for

    torch.set_num_threads(1)
    batching = StepBatching(shards_dir=run_dir / "shards", spec=masking_spec_for(load_tokenizer(base), "wwm+span",
                                                                                0.15, 0.2, 10),
                            seed=0, global_batch_size=global_batch, micro_batch_size=global_batch // 4,
                            seq_length=seq)
    steps = max(1, len(batching.shards) // global_batch)
    per_round = []
    for _ in range(rounds):
        sampler, tokens = SamplerState(), 0
        started = time.perf_counter()
        for _ in range(steps):
            batches, sampler = batching.build(sampler)
            tokens += sum(int(batch["attention_mask"].sum()) for batch in batches)
        seconds = time.perf_counter() - started
        per_round.append({"seconds": seconds, "tokens": tokens, "sequences": steps * global_batch})
    best = min(per_round, key=lambda run: run["seconds"])  # least disturbed by other processes
    median_s = statistics.median(run["seconds"] for run in per_round)
    return {"seq_length": seq, "global_batch": global_batch, "steps": steps, "rounds": rounds,
            "us_per_sequence": best["seconds"] / best["sequences"] * 1e6,
            "real_tokens_per_s": best["tokens"] / best["seconds"],
            "real_tokens_per_s_median": best["tokens"] / median_s,
            "mean_real_tokens_per_sequence": best["tokens"] / best["sequences"]}


def time_sampler(num_sequences: int, global_batch: int, steps: int) -> dict:
    """ms per step of picking a global batch, with the epoch order drawn at every step (the code before
    it was cached) and cached (now), side by side."""
    from cpt.training import batches as data

    def per_step_ms(permutation) -> float:
        original, data.epoch_permutation = data.epoch_permutation, permutation
        try:
            state, started = data.SamplerState(), time.perf_counter()
            for _ in range(steps):
                _picks, state = data.next_global_batch(state, num_sequences=num_sequences, count=global_batch, seed=0)
            return (time.perf_counter() - started) / steps * 1e3
        finally:
            data.epoch_permutation = original

    data.epoch_permutation.cache_clear()
    return {"num_sequences": num_sequences, "global_batch": global_batch,
            "ms_per_step_drawn_each_step": per_step_ms(data.epoch_permutation.__wrapped__),
            "ms_per_step_cached": per_step_ms(data.epoch_permutation)}


def run(work: Path, corpus: Path, rounds: int, log=print) -> dict:
    """Both measurements; the payload of bench/out/loader.json."""
    from cpt.config import PrepareConfig, TokenizeConfig
    from cpt.data.prepare import prepare_corpus
    from cpt.data.tokenization import tokenize_corpus
    from cpt.training.model import asset_path, init_base

    corpus = corpus if corpus.is_file() else asset_path("sample_corpus.txt")
    base = work / "base"
    if not (base / "config.json").exists():
        init_base(base, preset="tiny", seed=0)  # only its tokenizer (the real 21128 vocab) matters here
    non_embedding = bert_large_non_embedding_params()
    rows = []
    for seq, global_batch in ((128, 256), (512, 64)):
        run_dir = work / f"run-{seq}"
        prepare_corpus(PrepareConfig(output=run_dir, corpus=(str(corpus),), overwrite=True))
        tokenize_corpus(TokenizeConfig(output=run_dir, base_model=base, max_seq_length=seq, overwrite=True))
        row = time_step_batching(run_dir, base, seq, global_batch, rounds)
        row["gpu_needs_tokens_per_s"] = tokens_per_s_needed(seq, non_embedding)
        row["headroom"] = row["real_tokens_per_s"] / row["gpu_needs_tokens_per_s"]
        rows.append(row)
        log(f"loader, seq {seq}: {row['us_per_sequence']:.0f} us/sequence, {row['real_tokens_per_s'] / 1e3:.0f}k real "
            f"tokens/s in one process (median round {row['real_tokens_per_s_median'] / 1e3:.0f}k); BERT-large at "
            f"50 % MFU needs {row['gpu_needs_tokens_per_s'] / 1e3:.0f}k: headroom {row['headroom']:.2f}x")
    samplers = []
    for num_sequences in (100_000, 1_000_000, 2_600_000):  # 2.6M sequences of 128 tokens ~ a 1 GB corpus
        row = time_sampler(num_sequences, global_batch=256, steps=50)
        samplers.append(row)
        log(f"sampler, {num_sequences:,} sequences: {row['ms_per_step_drawn_each_step']:.1f} ms/step drawing the "
            f"order each step, {row['ms_per_step_cached']:.2f} ms/step cached")
    return {"corpus": str(corpus), "non_embedding_params": non_embedding, "rows": rows, "sampler": samplers}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=SHARED / "data" / "clue_small_2500.txt")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "loader.json")
    parser.add_argument("--work", type=Path, default=Path("/tmp/cpt-loader-bench"))
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    write_json(args.out, {"machine": machine_info(), **run(args.work, args.corpus, args.rounds)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
