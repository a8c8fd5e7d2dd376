"""Command line: ``structprune prune``, ``structprune eval``, ``structprune bench``, ``structprune export``.

Errors a user can fix (bad sparsity, missing model, unsupported architecture, short
calibration text, NaNs) are printed as one line and exit with status 2; the output
folder is written elsewhere and moved into place only when everything succeeded.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

import torch

from .errors import StructPruneError, io_error_message

log = logging.getLogger("structprune")

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# CPU-sized defaults: the protocol's 128x2048 calibration takes hours on a 2-core CPU.
CPU_DEFAULTS = {"nsamples": 8, "seqlen": 512, "eval_limit": 4}
GPU_DEFAULTS = {"nsamples": 128, "seqlen": 2048, "eval_limit": None}
EVAL_SEQLEN = 2048  # --eval-seqlen's default (docs/protocol.md)


def _datasets(s: str) -> list[str]:
    return [d.strip() for d in s.split(",") if d.strip()] if s else []


def _default_datasets(protocol) -> list[str]:
    """What a run evaluates when no set is named: WikiText-2, or the protocol's sets that can be
    read here (a set left out, PTB where nothing provides it, is said in one line)."""
    if protocol is None:
        return ["wikitext2"]
    have, notes = protocol.readable_datasets()
    for note in notes:
        print(f"[structprune] {note}", file=sys.stderr)
    return have


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="local HF folder, .gguf file, hub name, or smollm2-135m")
    p.add_argument("--device", default=None, help="compute device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                   help="weights dtype (default: float16 on GPU, float32 on CPU)")
    p.add_argument("--eval-limit", type=int, default=-1,
                   help="score only the first N windows of each dataset (default: all on GPU, 4 on CPU; 0: all)")
    p.add_argument("--eval-seqlen", type=int, default=EVAL_SEQLEN, help="evaluation window length (protocol: 2048)")
    p.add_argument("--protocol", default=None, choices=("cpu", "gpu"),
                   help="docs/protocol.md's sizes: cpu = calibration 32x2048, evaluation on the first 40 WikiText-2 "
                        "and 20 PTB and C4 windows of 2048; gpu = 128x2048 and every window (default: neither, "
                        "the device's defaults)")
    p.add_argument("--zero-shot-limit", type=int, default=-1,
                   help="zero-shot: a seeded random sample of N documents per task (default: 500 on CPU, every "
                        "document on GPU; 0: every document)")
    p.add_argument("--zero-shot-seed", type=int, default=0, help="seed of the zero-shot document sample")
    p.add_argument("--zero-shot-batch-size", type=int, default=16, help="zero-shot requests per forward")
    p.add_argument("--zero-shot-data", default=None,
                   help="folder with task files (<task>_<split>.jsonl[.gz], Hugging Face schema) used before the "
                        "packaged copies (default: $STRUCTPRUNE_ZEROSHOT_DATA, else zeroshot/ in the assets folder)")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    from .solvers import METHODS

    parser = argparse.ArgumentParser(prog="structprune", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prune", help="prune a model and evaluate it")
    add_common(p)
    p.add_argument("--sparsity", type=float, required=True, help="fraction of prunable decoder parameters to remove")
    p.add_argument("--method", default="structprune", choices=sorted(METHODS))
    p.add_argument("--allocation", default="auto",
                   help="auto (the method's default) | uniform | owl | threshold | softmax")
    p.add_argument("--calib", default="c4", help="c4 | wikitext2 | path to a text/json(l) file")
    p.add_argument("--nsamples", type=int, default=None, help="calibration windows (default: 128 GPU, 8 CPU; >= 1)")
    p.add_argument("--seqlen", type=int, default=None, help="calibration window length (default: 2048 GPU, 512 CPU)")
    p.add_argument("--batch-size", type=int, default=1, help="calibration windows per chunk through a layer")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval", default=None,
                   help="comma-separated perplexity sets (wikitext2,ptb,c4, a text file) and zero-shot tasks "
                        "(boolq,piqa,hellaswag,winogrande,arc_easy,arc_challenge,openbookqa; needs lm-eval): each is "
                        "scored on the dense and the pruned model (empty: none; default: wikitext2, the protocol's "
                        "three with --protocol)")
    p.add_argument("--mlp-multiple", type=int, default=8,
                   help="round kept MLP widths to this multiple (default 8 for MLP channels; 1: no rounding)")
    p.add_argument("--uniform-widths", action="store_true", help="same kept widths in every layer")
    p.add_argument("--temperature", type=float, default=None, help="softmax allocation temperature (inf: uniform)")
    p.add_argument("--energy-scale", dest="energy_scale", choices=("std-split", "std", "robust"), default=None,
                   help="softmax allocation: how step energies are standardised (docs/structprune.md)")
    # ADMM across layers (iterations, rho, tol_abs, tol_rel, select) is in the Python API only: at the
    # CPU protocol it ended worse than the one-shot pass (docs/structprune.md, section 3).
    p.add_argument("--inner-iterations", dest="inner_iterations", type=int, default=None,
                   help="StructPrune: alternating refits of each MLP's kept input rows with its output projection "
                        "(auxiliary variables; 0: output projection only)")
    p.add_argument("--value-iterations", dest="value_iterations", type=int, default=None,
                   help="StructPrune: alternating refits of each attention's kept value rows with its output "
                        "projection, attention probabilities frozen (0: output projection only)")
    p.add_argument("--input-damp", dest="input_damp", type=float, default=None,
                   help="StructPrune: ridge of the --inner-iterations/--value-iterations input-row refits toward "
                        "the current rows, relative to the Gram's mean diagonal (default: the refits' dampening, 0.01)")
    p.add_argument("--target", default=None, choices=("own", "dense"), help="StructPrune refit anchor")
    p.add_argument("--cut-paths", dest="cut_paths", default=None, choices=("pruned", "dense"),
                   help="StructPrune's cutting pass: re-solve each module's removal path on the pruned model's "
                        "inputs (pruned, default) or cut the dense profile's paths (dense: faster; refit on the "
                        "pruned inputs either way)")
    p.add_argument("--output", required=True, help="folder for the pruned model and report.json")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--resume", action="store_true",
                   help="continue a streamed run that was killed (same command otherwise) from its last finished "
                        "layer; the output is the same bytes as an uninterrupted run's")
    p.add_argument("--max-shard-size", default="2GB",
                   help="split safetensors weights above this size (e.g. 500MB); streamed to disk: costs no memory")
    p.add_argument("--max-memory", default=None,
                   help="memory the streamed run may use (e.g. 6GiB; default: the container's cgroup limit, else "
                        "the machine's); the activation budget follows from it, and a limit too small for one layer "
                        "is refused before any work")
    p.add_argument("--activation-budget", default=None,
                   help="calibration activations kept in RAM at most (e.g. 4GiB); the rest spill to memory-mapped "
                        "files (default: $STRUCTPRUNE_ACTIVATION_BUDGET, else half of what the memory limit leaves "
                        "after one layer's work; inf: no limit)")
    p.add_argument("--offload-dir", default=None, help="folder for spilled activations (default: the temp folder)")
    p.add_argument("--in-memory", action="store_true",
                   help="load the whole model instead of streaming a checkpoint folder one layer at a time")
    p.add_argument("--gguf", default=None,
                   help="also write the pruned model as GGUF for llama.cpp / ollama next to the safetensors, in these "
                        "comma-separated types (f32, f16, bf16, q8_0; q4_k_m and the other llama.cpp types need "
                        "'structprune[gguf]'), e.g. f16,q4_k_m")
    p.add_argument("--tokenizer-pre", default=None,
                   help="llama.cpp's pre-tokenizer name for the GGUF when its hash table does not know the tokenizer")

    e = sub.add_parser("eval", help="perplexity of a model (dense or pruned)")
    add_common(e)
    e.add_argument("--datasets", default=None,
                   help="comma-separated: wikitext2,ptb,c4 (default: wikitext2, or none with --zero-shot)")
    e.add_argument("--zero-shot", default=None,
                   help="comma-separated lm-eval tasks, e.g. boolq,piqa,hellaswag,winogrande,arc_easy,"
                        "arc_challenge,openbookqa (needs lm-eval; the data of all but openbookqa ships with "
                        "StructPrune)")
    e.add_argument("--json", default=None, help="also write the results to this JSON file")

    b = sub.add_parser("bench", help="prefill/decode tokens/s and peak memory (dense vs pruned)")
    b.add_argument("model", help="model spec or exported folder")
    b.add_argument("--compare", default=None, help="a second model to measure side by side (e.g. the pruned one)")
    b.add_argument("--batch-sizes", default="1,16", help="comma-separated batch sizes (protocol: 1,16)")
    b.add_argument("--prompt-len", type=int, default=2048, help="prompt tokens (protocol: 2048)")
    b.add_argument("--new-tokens", type=int, default=128, help="generated tokens (protocol: 128)")
    b.add_argument("--repeats", type=int, default=5, help="timed runs; the median is reported")
    b.add_argument("--warmup", type=int, default=2, help="untimed runs first")
    b.add_argument("--device", default=None, help="compute device (default: cuda if available, else cpu)")
    b.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                   help="weights dtype (default: float16 on GPU, float32 on CPU)")
    b.add_argument("--json", default=None, help="also write the results to this JSON file")
    b.add_argument("--trust-remote-code", action="store_true")
    b.add_argument("-q", "--quiet", action="store_true")

    x = sub.add_parser("export", help="write a model folder (pruned or dense) in another format: GGUF for llama.cpp")
    x.add_argument("model", help="a folder written by `structprune prune --output` (or a LLaMA/Mistral/Qwen2 "
                                 "Hugging Face folder)")
    x.add_argument("--format", default="gguf", choices=("gguf",), help="output format (gguf: llama.cpp, ollama)")
    x.add_argument("--type", default="f16",
                   help="GGUF tensor type: f32, f16, bf16, q8_0, or a llama.cpp quantization (q4_k_m, q5_k_m, q6_k, "
                        "q4_0, ...; needs 'structprune[gguf]')")
    x.add_argument("--output", required=True, help="the .gguf file to write")
    x.add_argument("--tokenizer-pre", default=None,
                   help="llama.cpp's pre-tokenizer name, when its hash table does not know the tokenizer")
    x.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    x.add_argument("-q", "--quiet", action="store_true")
    return parser


def resolve_runtime(args) -> tuple[torch.device, torch.dtype, dict]:
    device = torch.device(args.device) if args.device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise StructPruneError("--device cuda requested but no CUDA GPU is available")
    dtype = DTYPES[args.dtype] if args.dtype else (torch.float16 if device.type == "cuda" else torch.float32)
    defaults = GPU_DEFAULTS if device.type == "cuda" else CPU_DEFAULTS
    return device, dtype, defaults


def _split_eval(names: list[str]) -> tuple[list[str], list[str]]:
    """``(perplexity sets, zero-shot tasks)`` from ``--eval``'s names; task names are checked here (one
    line for an unknown one) so that nothing slow runs first."""
    from .data.corpora import is_corpus_name

    corpora = [n for n in names if is_corpus_name(n)]
    tasks = [n for n in names if not is_corpus_name(n)]
    if tasks:
        from .eval.zeroshot import check_tasks, import_lm_eval

        import_lm_eval()  # fail before loading the model if lm-eval is missing
        tasks = check_tasks(tasks)
    return corpora, tasks


def _zero_shot_limit(args, device: torch.device) -> int | None:
    from .eval.zeroshot import CPU_LIMIT

    if args.zero_shot_limit < -1:
        raise StructPruneError(f"--zero-shot-limit must be >= 0 (0: every document), got {args.zero_shot_limit}")
    if args.zero_shot_limit == -1:
        return CPU_LIMIT if device.type == "cpu" else None
    return args.zero_shot_limit or None


def _zero_shot_banner(args, device, limit, tasks) -> None:
    if args.zero_shot_limit == -1 and device.type == "cpu" and _is_main_rank():
        print(f"[structprune] CPU run: zero-shot ({','.join(tasks)}) on a seeded random sample of {limit} documents "
              f"per task (seed {args.zero_shot_seed}; --zero-shot-limit 0 scores every document, the default on a "
              "GPU)", file=sys.stderr)
    elif args.zero_shot_limit == -1:
        print(f"[structprune] zero-shot ({','.join(tasks)}) on every document", file=sys.stderr)


def _zero_shot(model, tok, tasks, args, limit) -> dict:
    from .eval.zeroshot import zero_shot

    return zero_shot(model, tok, tasks, limit=limit, seed=args.zero_shot_seed, batch_size=args.zero_shot_batch_size,
                     data_dir=args.zero_shot_data, quiet=args.quiet)


def _eval(model, tok, datasets, args, limit, device) -> dict:
    from .eval.perplexity import evaluate_datasets

    res = evaluate_datasets(model, tok, datasets, seqlen=args.eval_seqlen, limit=limit, device=device,
                            progress=not args.quiet)
    return {k: v.to_dict() for k, v in res.items()}


def _protocol(args):
    """The ``--protocol`` (eval/protocol.py) or None; it fixes the sizes, so giving them too is refused."""
    from .eval.protocol import get_protocol

    if getattr(args, "protocol", None) is None:
        return None
    protocol = get_protocol(args.protocol)
    given = [flag for flag, value, unset in (("--nsamples", getattr(args, "nsamples", None), None),
                                             ("--seqlen", getattr(args, "seqlen", None), None),
                                             ("--eval-limit", args.eval_limit, -1),
                                             ("--eval-seqlen", args.eval_seqlen, EVAL_SEQLEN))
             if value != unset and not (flag == "--eval-seqlen" and value == protocol.eval_seqlen)]
    if given:
        raise StructPruneError(f"--protocol {protocol.name} fixes the calibration and evaluation sizes; drop "
                               f"{', '.join(given)} (or drop --protocol)")
    args.eval_seqlen = protocol.eval_seqlen  # read by every evaluation below
    return protocol


def _counts(args, defaults: dict) -> tuple[int, int, int | None | dict]:
    """``(nsamples, seqlen, eval limit)``: the protocol's with ``--protocol`` (the limit then a
    mapping per dataset), else the device's defaults where not given; 0 is refused for the
    calibration sizes (it once silently meant the default) and means "every window" for
    ``--eval-limit``."""
    protocol = _protocol(args)
    if protocol is not None:
        return protocol.calib_nsamples, protocol.calib_seqlen, dict(protocol.eval_limits)
    if args.nsamples is not None and args.nsamples < 1:
        raise StructPruneError(f"--nsamples must be at least 1, got {args.nsamples}")
    if args.seqlen is not None and args.seqlen < 2:
        raise StructPruneError(f"--seqlen must be at least 2, got {args.seqlen}")
    if args.eval_limit < -1:
        raise StructPruneError(f"--eval-limit must be >= 0 (0: every window), got {args.eval_limit}")
    nsamples = defaults["nsamples"] if args.nsamples is None else args.nsamples
    seqlen = defaults["seqlen"] if args.seqlen is None else args.seqlen
    limit = defaults["eval_limit"] if args.eval_limit == -1 else (args.eval_limit or None)
    return nsamples, seqlen, limit


def _streams_from_disk(args, config) -> str | None:
    """The checkpoint folder to stream from, or None for the in-memory path (a GGUF file or hub
    model, ``--in-memory``, or the O(N) ``global`` reference, which needs the whole model)."""
    from .export.loader import is_structprune_export
    from .models.loading import resolve_model

    if args.in_memory or config.method == "global":
        return None
    resolved = resolve_model(args.model)
    if resolved.kind != "hf-folder" or is_structprune_export(resolved.path):
        return None
    has_weights = any((resolved.path / f).is_file() for f in ("model.safetensors", "model.safetensors.index.json"))
    return str(resolved.path) if has_weights else None


def _check_family(model_config) -> None:
    from .adapters import supported_model_types
    from .errors import UnsupportedArchitectureError

    family = getattr(model_config, "structprune_base_model_type", None) or model_config.model_type
    if family not in supported_model_types():  # get_adapter's check and message, from the config alone
        raise UnsupportedArchitectureError(f"unsupported architecture {family!r}: StructPrune supports "
                                           f"{', '.join(supported_model_types())}")


def cmd_prune(args) -> dict:
    from .api import build_calibration, needs_calibration, prune
    from .config import PruneConfig
    from .eval.intervals import comparison
    from .eval.zeroshot import compare_zero_shot
    from .eval.perplexity import encode_corpus
    from .engine import distributed
    from .export import atomic_output_dir, check_output_dir, save_pruned, write_json
    from .plots import write_run_plots
    from .memory import process_peak_rss
    from .models.loading import config_context_length, load_model, load_tokenizer_and_config

    t_start = time.perf_counter()
    device, dtype, defaults = resolve_runtime(args)
    device = _join_ranks(args, device)
    nsamples, seqlen, limit = _counts(args, defaults)
    solver_opts = ("temperature", "energy_scale", "inner_iterations", "value_iterations", "input_damp", "target",
                   "cut_paths")
    overrides = {k: getattr(args, k) for k in solver_opts if getattr(args, k) is not None}
    config = PruneConfig(method=args.method, sparsity=args.sparsity, allocation=args.allocation, calib=args.calib,
                         nsamples=nsamples, seqlen=seqlen, seed=args.seed, batch_size=args.batch_size,
                         mlp_multiple=args.mlp_multiple, uniform_widths=args.uniform_widths,
                         activation_budget=args.activation_budget, offload_dir=args.offload_dir, **overrides)
    protocol = _protocol(args)
    datasets, tasks = _split_eval(_datasets(args.eval) if args.eval is not None else _default_datasets(protocol))
    zs_limit = _zero_shot_limit(args, device) if tasks else None
    if protocol is None and device.type == "cpu" and (args.nsamples is None or args.seqlen is None
                                                      or args.eval_limit == -1) and distributed.is_main():
        print(f"[structprune] CPU run: CPU-sized defaults, calibration {nsamples}x{seqlen}, evaluation on the "
              f"first {limit or 'all'} windows of {args.eval_seqlen}, a smoke test (--protocol cpu: the CPU protocol "
              "of docs/protocol.md, 32x2048 and 40/20/20 windows with intervals; pass --nsamples, --seqlen, "
              "--eval-limit to change; --eval-limit 0 scores every window)",
              file=sys.stderr)
    if tasks:
        _zero_shot_banner(args, device, zs_limit, tasks)

    # Everything that can be checked without the weights is checked before the slow load:
    # output folder, sequence lengths, calibration text, evaluation sets.
    check_output_dir(args.output, overwrite=args.overwrite)
    gguf_types = _gguf_types(args.gguf)
    from .export.shards import parse_size

    parse_size(args.max_shard_size)  # not only when the first shard is written
    tok, model_config = load_tokenizer_and_config(args.model, trust_remote_code=args.trust_remote_code)
    if model_config is not None:  # an unsupported family is refused before the calibration text and the weights
        _check_family(model_config)
        if gguf_types:  # and a family llama.cpp cannot run from this exporter, before the slow part
            from .export.gguf import check_family

            check_family(getattr(model_config, "structprune_base_model_type", None) or model_config.model_type,
                         uniform=args.uniform_widths)
    ctx = config_context_length(model_config) if model_config is not None else None
    for what, n in (("--seqlen", seqlen), ("--eval-seqlen", args.eval_seqlen if datasets else 0)):
        if ctx is not None and n > ctx:
            raise StructPruneError(f"{what} {n} exceeds the model's context of {ctx} tokens")
    calib = build_calibration(tok, config) if needs_calibration(config) else None
    for d in datasets:
        encode_corpus(tok, d)  # tokenised once here, cached for the evaluations below
    if tasks:  # the task files are read (and the packaged ones checked) before the slow part
        from .data.tasks import load_task_data

        for t in tasks:
            load_task_data(t, args.zero_shot_data)

    streamed = _streams_from_disk(args, config)
    if args.max_memory is not None and streamed is None:
        raise StructPruneError("--max-memory bounds a run streamed from a checkpoint folder; this run holds the "
                               "whole model in memory (--in-memory, a GGUF file, a hub model or --method global)")
    budget = args.activation_budget
    if streamed is not None:  # before any work: a limit too small for one layer is refused now
        from .api import checkpoint_memory_plan

        plan = checkpoint_memory_plan(streamed, config, dtype, args.max_memory,
                                      eval_seqlen=args.eval_seqlen if datasets else 0)
        if budget is None and plan.activation_budget is not None:
            budget = plan.activation_budget
        if not args.quiet:
            # (not `limit`: that is the evaluation's window limit, read by evaluate() below)
            may_use = "unknown" if plan.limit is None else f"{plan.limit / 2**30:.2f} GiB ({plan.limit_source})"
            acts = (args.activation_budget if args.activation_budget is not None
                    else "the default" if budget is None else f"{budget / 2**30:.2f} GiB")
            print(f"[structprune] memory: may use {may_use}; one layer's work about "
                  f"{plan.working_set_bytes / 2**30:.2f} GiB; activations in RAM up to {acts}", file=sys.stderr)
    if args.resume and streamed is None:
        raise StructPruneError("--resume continues a run streamed from a checkpoint folder; this run holds the "
                               "model in memory (--in-memory, a GGUF file, a hub model or --method global) and "
                               "cannot be resumed")
    # A streamed run keeps its partial output in .NAME.partial with a journal: a killed run
    # continues with --resume (api.prune_checkpoint).
    # Under torchrun rank 0 alone creates, writes and moves the folder; every rank prunes (api.py).
    with distributed.main_only(atomic_output_dir(args.output, overwrite=args.overwrite, resumable=streamed is not None,
                                                 resume=args.resume,
                                                 keep_unless_refused=distributed.is_distributed())) as tmp:
        if streamed is not None:  # a checkpoint folder: one layer in memory, never the whole model
            from .api import prune_checkpoint
            from .eval.streamed import evaluate_checkpoint

            def evaluate(folder):
                return evaluate_checkpoint(folder, tok, datasets, seqlen=args.eval_seqlen, limit=limit, device=device,
                                           dtype=dtype, progress=not args.quiet, ram_budget=budget)

            def zero_shot_of(folder):  # lm-eval needs the whole model: loaded for the zero-shot tasks only
                zmodel, ztok = load_model(str(folder), dtype=dtype, device=device,
                                          trust_remote_code=args.trust_remote_code)
                try:
                    return _zero_shot(zmodel, ztok, tasks, args, zs_limit)
                finally:
                    del zmodel

            dense_ppl = evaluate(streamed) if datasets else {}
            dense_zs = zero_shot_of(streamed) if tasks else None
            result = prune_checkpoint(streamed, tmp, calib, config, tokenizer=tok, device=device, dtype=dtype,
                                      max_shard_size=args.max_shard_size, progress=not args.quiet,
                                      overwrite=True, atomic=False, resume=args.resume, max_memory=args.max_memory)
            pruned_ppl = evaluate(tmp) if datasets else {}
            pruned_zs = zero_shot_of(tmp) if tasks else None
            report = result.report
        else:
            t0 = time.perf_counter()
            model, tok = load_model(args.model, dtype=dtype, device="cpu", trust_remote_code=args.trust_remote_code)
            log.info("loaded %s in %.1fs", args.model, time.perf_counter() - t0)
            dense_ppl = _eval(model.to(device), tok, datasets, args, limit, device) if datasets else {}
            dense_zs = _zero_shot(model, tok, tasks, args, zs_limit) if tasks else None
            model.to("cpu")  # pruning streams one layer at a time to the device
            result = prune(model, calib, config=config, tokenizer=tok, device=device, progress=not args.quiet)
            pruned_ppl = _eval(model.to(device), tok, datasets, args, limit, device) if datasets else {}
            pruned_zs = _zero_shot(model, tok, tasks, args, zs_limit) if tasks else None
            model.to("cpu")
            report = result.report
            if distributed.is_main():
                export = save_pruned(model, tok, tmp, plans=result.plans, max_shard_size=args.max_shard_size)
                report["export"] = export.to_dict()
            distributed.barrier()  # the folder is complete before any rank leaves
        if not distributed.is_main():
            return report  # rank 0 writes the report and prints the summary
        report["model"] = args.model
        # Per dataset: both perplexities with 95% bootstrap intervals over windows, the paired
        # ratio pruned/dense on the same windows with its interval, the per-window NLLs.
        report["ppl"] = {d: comparison(dense_ppl[d], pruned_ppl[d]) for d in datasets}
        # Per task: both accuracies (lm-eval's, with 95% intervals) on the same documents, the paired
        # difference pruned - dense with its bootstrap interval, the per-document scores; and the mean.
        report["zero_shot"] = compare_zero_shot(dense_zs, pruned_zs) if tasks else None
        report["protocol"] = protocol.to_dict() if protocol else None
        # The command that makes this model: a resumed run's is the interrupted run's.
        report["command"] = "structprune " + " ".join(a for a in sys.argv[1:] if a != "--resume")
        report["versions"] = _versions()
        report["total_seconds"] = time.perf_counter() - t_start
        report["process_peak_rss_bytes"] = process_peak_rss()
        # Drawn once: a streamed run's export already drew them (their titles need nothing added here).
        drawn = tmp / "report.json"
        drawn = json.loads(drawn.read_text()).get("plots") if drawn.is_file() else None
        report["plots"] = drawn or write_run_plots(report, tmp)  # never fails the run: a missing matplotlib is a note
        if gguf_types:
            report["gguf"] = _write_ggufs(tmp, args.output, gguf_types, args.tokenizer_pre)
        write_json(tmp / "report.json", report)
        from .export.card import write_model_card

        write_model_card(tmp, report)  # README.md: the model card (measured perplexities, the command, how to run it)
    print_summary(report, args.output)
    return report


def _is_main_rank() -> bool:
    from .engine import distributed

    return distributed.is_main()


def _join_ranks(args, device: torch.device) -> torch.device:
    """Under torchrun (``WORLD_SIZE > 1``): join the job's process group; a restart continues the
    interrupted run (``--resume``); only rank 0 prints; each rank of a GPU node takes its own GPU
    unless ``--device`` names one. Returns the device."""
    from .engine import distributed

    if not distributed.setup(device):
        return device
    args.resume = args.resume or distributed.restarted()
    if not distributed.is_main():
        args.quiet = True
        logging.getLogger().setLevel(logging.WARNING)
    return distributed.default_device() if device.type == "cuda" and device.index is None else device


def _gguf_types(spec: str | None) -> list[str]:
    """``--gguf``'s types, checked before anything slow (a llama.cpp type needs llama-cpp-python)."""
    if not spec:
        return []
    from .export.gguf import check_type

    return list(dict.fromkeys(check_type(t) for t in spec.split(",") if t.strip()))


def _write_ggufs(folder, output: str, types: list[str], tokenizer_pre: str | None) -> list[dict]:
    from pathlib import Path

    from .export.gguf import default_name, export_gguf

    out = []
    for t in types:
        name = default_name(output, t)
        r = export_gguf(folder, Path(folder) / name, t, tokenizer_pre=tokenizer_pre, name=Path(output).name)
        out.append({**r.to_dict(), "path": name})
    return out


def cmd_export(args) -> dict:
    from pathlib import Path

    from .export.gguf import check_type, export_gguf

    gguf_type = check_type(args.type)
    out = Path(args.output)
    if out.suffix != ".gguf":
        raise StructPruneError(f"--output {args.output} should end in .gguf")
    if out.exists() and not args.overwrite:
        raise StructPruneError(f"output file {out} exists; pass --overwrite or choose another")
    t0 = time.perf_counter()
    r = export_gguf(args.model, out, gguf_type, tokenizer_pre=args.tokenizer_pre)
    widths = " ".join(f"{i}:{l['heads']}h/{l['kv_heads']}kv/{l['mlp']}" for i, l in enumerate(r.layers))
    print(f"wrote {out} ({r.bytes / 2**20:.1f} MiB, {r.type}, llama.cpp architecture {r.arch}, tokenizer "
          f"{r.tokenizer['model']}/{r.tokenizer['pre']}) in {time.perf_counter() - t0:.1f}s\nlayer widths        {widths}")
    return r.to_dict()


def _versions() -> dict:
    from .provenance import library_versions

    return library_versions()


def print_summary(r: dict, out: str) -> None:
    from .memory import mib

    cal = r["calibration"]
    lines = [
        f"method              {r['method']} (allocation {r['allocation']})",
        f"sparsity            target {r['sparsity_target']:.4f}  achieved {r['sparsity_achieved']:.4f} "
        "(of prunable decoder parameters)",
        f"parameters          {r['params_before']:,} -> {r['params_after']:,} "
        f"(prunable {r['prunable_params_before']:,} -> {r['prunable_params_after']:,})",
        "calibration         " + (f"{cal['source']} {cal['nsamples']}x{cal['seqlen']} seed {cal['seed']}" if cal
                                  else "none (the method reads the weights only)"),
        f"prune time          {r['prune_seconds']:.1f}s on {r['device']} ({r['dtype']})",
        f"total time          {r['total_seconds']:.1f}s (load, evaluate, prune, evaluate, save)",
        f"peak memory         {mib(r['peak_rss_bytes'])} resident while pruning, "
        f"{mib(r['process_peak_rss_bytes'])} over the whole run",
        "peak GPU memory     " + (mib(r["peak_gpu_mem_bytes"]) if r["peak_gpu_mem_bytes"] else "n/a (no GPU)"),
    ]
    for d, p in r.get("ppl", {}).items():
        ci = {k: f" [{p[k][0]:.2f}, {p[k][1]:.2f}]" if p.get(k) else "" for k in ("dense_interval", "pruned_interval")}
        ratio = p.get("ratio_pruned_to_dense")
        lines.append(f"ppl {d:<15} dense {p['dense']:.3f}{ci['dense_interval']} -> pruned {p['pruned']:.3f}"
                     f"{ci['pruned_interval']} ({p['nwindows']} windows of {p['seqlen']})"
                     + (f"; ratio {ratio['value']:.3f} [{ratio['low']:.3f}, {ratio['high']:.3f}]" if ratio else ""))
    if r.get("zero_shot"):
        from .eval.zeroshot import format_comparison

        lines.extend(format_comparison(r["zero_shot"]))
    for kind, path in (r.get("plots") or {}).items():
        lines.append(f"plot {kind:<15} {path}")
    lines.append("layer widths        " + " ".join(f"{i}:{l['heads']}h/{l['kv_heads']}kv/{l['mlp']}"
                                                  for i, l in enumerate(r["layers"])))
    lines.append(f"saved to            {out}")
    print("\n".join(lines))


def cmd_eval(args) -> dict:
    from .models.loading import load_model

    device, dtype, defaults = resolve_runtime(args)
    device = _join_ranks(args, device)  # under torchrun each rank scores its share of the windows
    protocol = _protocol(args)
    limit = dict(protocol.eval_limits) if protocol else (defaults["eval_limit"] if args.eval_limit == -1
                                                         else (args.eval_limit or None))
    tasks = _split_eval(_datasets(args.zero_shot))[1] if args.zero_shot else []
    if args.zero_shot and len(tasks) != len(_datasets(args.zero_shot)):
        raise StructPruneError("--zero-shot takes task names; perplexity sets go in --datasets")
    zs_limit = _zero_shot_limit(args, device) if tasks else None
    if tasks:
        from .data.tasks import load_task_data

        _zero_shot_banner(args, device, zs_limit, tasks)
        for t in tasks:
            load_task_data(t, args.zero_shot_data)
    model, tok = load_model(args.model, dtype=dtype, device=device, trust_remote_code=args.trust_remote_code)
    if args.datasets is not None:
        datasets = _datasets(args.datasets)
    else:
        datasets = [] if args.zero_shot else _default_datasets(protocol)
    res = _eval(model, tok, datasets, args, limit, device) if datasets else {}  # --zero-shot alone: no perplexity
    if not _is_main_rank():
        return res  # rank 0 prints and writes (zero-shot tasks are not split over ranks: rank 0 runs them)
    for d, v in res.items():
        ci = f" [{v['ppl_interval'][0]:.4f}, {v['ppl_interval'][1]:.4f}] (95% bootstrap)" if v["ppl_interval"] else ""
        print(f"ppl {d:<10} {v['ppl']:.4f}{ci} ({v['nwindows']} windows of {v['seqlen']}, {v['ntokens']} tokens)")
    # Per dataset: perplexity, its interval and the per-window NLLs (for paired ratios with another run).
    out = {"model": args.model, "ppl": res, "protocol": protocol.to_dict() if protocol else None,
           "versions": _versions()}
    if tasks:
        from .eval.zeroshot import format_zero_shot

        out["zero_shot"] = _zero_shot(model, tok, tasks, args, zs_limit)
        print("\n".join(format_zero_shot(out["zero_shot"])))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return res


def cmd_bench(args) -> dict:
    from .bench import run_bench

    device, dtype, _ = resolve_runtime(args)
    try:
        batch_sizes = [int(b) for b in _datasets(args.batch_sizes)]
    except ValueError:
        raise StructPruneError(f"--batch-sizes must be comma-separated integers, got {args.batch_sizes!r}") from None
    return run_bench(args.model, args.compare, device=device, dtype=dtype, batch_sizes=batch_sizes,
                     prompt_len=args.prompt_len, new_tokens=args.new_tokens, repeats=args.repeats,
                     warmup=args.warmup, json_path=args.json, trust_remote_code=args.trust_remote_code)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="[%(name)s] %(message)s")
    try:
        {"prune": cmd_prune, "eval": cmd_eval, "bench": cmd_bench, "export": cmd_export}[args.command](args)
    except StructPruneError as e:
        from .errors import RankFailure

        if _is_main_rank() or isinstance(e, RankFailure):  # every rank refuses alike: rank 0 says it once
            print(f"structprune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # The output folder is written elsewhere and moved into place only at the end: nothing partial remains.
        print("\nstructprune: interrupted; no output was written", file=sys.stderr)
        return 130
    except (OSError, _safetensors_error()) as e:  # full disk, permissions, I/O: the environment, not a bug
        nothing = ""
        if getattr(args, "output", None) and not os.path.exists(args.output):
            nothing = f"; nothing was written to {args.output}"
        print(f"structprune: error: {io_error_message(e)}{nothing}", file=sys.stderr)
        return 2
    return 0


def _safetensors_error() -> type[BaseException]:
    from safetensors import SafetensorError

    return SafetensorError


if __name__ == "__main__":
    sys.exit(main())
