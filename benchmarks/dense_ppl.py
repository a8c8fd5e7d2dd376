"""Dense-model perplexity under docs/protocol.md, written to JSON.

Example:
    python benchmarks/dense_ppl.py --model smollm2-135m --dataset wikitext2 \
        --seqlen 2048 --dtype float32 --device cpu --out benchmarks/results/dense_wikitext2.json
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import shlex
import sys
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a checkout without install

from structprune.bench import hardware_name  # noqa: E402
from structprune.eval import perplexity  # noqa: E402
from structprune.models import load_model  # noqa: E402

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dataset", default="wikitext2", help="wikitext2, ptb, c4 or a text file")
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--limit", type=int, default=None, help="score only the first N windows")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="JSON file to write")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    start = time.perf_counter()
    model, tokenizer = load_model(args.model, dtype=DTYPES[args.dtype], device=args.device)
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    result = perplexity(
        model,
        tokenizer,
        args.dataset,
        seqlen=args.seqlen,
        limit=args.limit,
        device=args.device,
        batch_size=args.batch_size,
    )
    eval_s = time.perf_counter() - start

    record = {
        **result.to_dict(),
        "model": args.model,
        "dtype": args.dtype,
        "device": args.device,
        "device_name": hardware_name(args.device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "load_seconds": round(load_s, 2),
        "wall_seconds": round(eval_s, 2),
        "command": shlex.join(["python", "benchmarks/dense_ppl.py", *(argv if argv is not None else sys.argv[1:])]),
    }
    print(f"{'dataset':<12}{'ppl':>12}{'windows':>9}{'tokens':>10}{'seqlen':>8}{'seconds':>10}")
    print(
        f"{result.dataset:<12}{result.ppl:>12.4f}{result.nwindows:>9}{result.ntokens:>10}{result.seqlen:>8}{eval_s:>10.1f}"
    )
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
