"""`structprune bench` and `structprune eval` on exported folders (tiny models, seconds)."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch

from structprune.bench import bench_model, format_table
from structprune.cli import main
from structprune.errors import StructPruneError
from structprune.export import save_pruned

from test_export import cut_nonuniform
from tiny import tiny_llama, tiny_opt


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    model = tiny_llama(layers=2)
    save_pruned(model, None, root / "dense")
    cut_nonuniform(model)
    save_pruned(model, None, root / "pruned")
    return root


@pytest.mark.parametrize("make", [tiny_llama, tiny_opt])
def test_bench_model_rows(make):
    rows = bench_model(make(layers=1), batch_sizes=(1, 2), prompt_len=8, new_tokens=3, repeats=1, warmup=0)
    assert [r["batch"] for r in rows] == [1, 2]
    for r in rows:
        assert r["prefill_tok_s"] == pytest.approx(r["batch"] * 8 / r["prefill_s"])
        assert r["generate_s"] > 0 and r["peak_mem_bytes"] > 0 and r["peak_mem_kind"] == "cpu_peak_rss"
        assert math.isnan(r["decode_tok_s"]) or r["decode_tok_s"] > 0


def test_bench_rejects_prompts_beyond_the_context():
    with pytest.raises(StructPruneError, match="context"):
        bench_model(tiny_llama(layers=1), prompt_len=128, new_tokens=8, repeats=1, warmup=0)


def test_bench_cli_compares_and_writes_json(folders, tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = main(["bench", str(folders / "dense"), "--compare", str(folders / "pruned"), "--batch-sizes", "1,2",
               "--prompt-len", "8", "--new-tokens", "2", "--repeats", "1", "--warmup", "0", "--json", str(out), "-q"])
    assert rc == 0
    res = json.loads(out.read_text())
    assert list(res["models"]) == [str(folders / "dense"), str(folders / "pruned")]
    assert res["models"][str(folders / "pruned")]["params"] < res["models"][str(folders / "dense")]["params"]
    assert res["settings"]["prompt_len"] == 8
    table = capsys.readouterr().out
    assert "prefill tok/s" in table and table.count("| " + str(folders / "pruned")) == 2
    assert format_table(res["models"]).startswith("| model")


def test_bench_cli_bad_batch_sizes(folders, capsys):
    assert main(["bench", str(folders / "dense"), "--batch-sizes", "1,x", "-q"]) == 2
    assert "batch-sizes" in capsys.readouterr().err


def test_eval_cli_loads_an_export_without_trust_remote_code(tmp_path, byte_tokenizer, capsys):
    """An exported per-layer model is recognised and loaded (packaged modeling code, weights verified)."""
    from structprune.models.loading import load_model

    model = tiny_llama(layers=2)
    model.resize_token_embeddings(len(byte_tokenizer))
    cut_nonuniform(model)
    save_pruned(model, byte_tokenizer, tmp_path / "m")
    capsys.readouterr()
    loaded, tok = load_model(str(tmp_path / "m"))
    assert loaded.config.model_type == "structprune_llama" and len(tok) == len(byte_tokenizer)
    captured = capsys.readouterr()
    assert "custom code" not in captured.out + captured.err  # the tokenizer must not ask to run the folder's code
    rc = main(["eval", str(tmp_path / "m"), "--datasets", "wikitext2", "--eval-limit", "1", "--eval-seqlen", "32",
               "-q", "--json", str(tmp_path / "e.json")])
    assert rc == 0, capsys.readouterr().err
    assert "ppl wikitext2" in capsys.readouterr().out
    assert json.loads((tmp_path / "e.json").read_text())["ppl"]["wikitext2"]["nwindows"] == 1


def test_eval_cli_on_a_broken_folder_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "structprune_llama", "structprune": {}}))
    assert main(["eval", str(tmp_path), "-q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("structprune: error:") and "safetensors" in err


# -- zero-shot ----------------------------------------------------------------------------


def test_zero_shot_without_lm_eval_says_so(folders, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval -> ImportError
    assert main(["eval", str(folders / "dense"), "--zero-shot", "boolq,piqa", "-q"]) == 2
    assert "lm-evaluation-harness" in capsys.readouterr().err


# zero_shot() against the real lm-eval, on the shipped task data: tests/test_zeroshot.py (marked lm_eval).


def test_cpu_peak_memory_is_per_model_not_cumulative():
    """A small model measured after a large one in the same process reads its own, smaller peak."""
    from transformers import LlamaConfig, LlamaForCausalLM

    def model(hidden):
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(vocab_size=8000, hidden_size=hidden, intermediate_size=2 * hidden,
                                            num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                                            max_position_embeddings=64)).eval()

    kw = dict(batch_sizes=(1,), prompt_len=8, new_tokens=2, repeats=1, warmup=0)
    big = model(1024)  # ~100M parameters of fp32: 0.4 GB more resident than the small one
    peak_big = bench_model(big, **kw)[0]["peak_mem_bytes"]
    del big
    peak_small = bench_model(model(128), **kw)[0]["peak_mem_bytes"]
    assert peak_small < peak_big - 100 * 2**20, (peak_small, peak_big)  # cumulative peaks would be equal
