"""Every refused input and failure listed in docs/errors.md, with its message (issue 12).

Each test names the rows it covers (``@covers("id")``); ``test_every_row_of_the_page_is_covered``
checks that the page's rows and the covered ids are the same set. Inputs that concern the model
run on tiny LLaMA (GQA), Qwen2 and OPT models (tests/tiny.py); from the command line, with a
97-character tokenizer that fits their 101-token vocabulary.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import sys
from pathlib import Path

import pytest
import torch
from tiny import FACTORIES, VOCAB, calib_ids

from structprune import api
from structprune.cli import main
from structprune.config import PruneConfig
from structprune.errors import StructPruneError

PAGE = Path(__file__).resolve().parents[1] / "docs" / "errors.md"
COVERED: set[str] = set()
FAMILIES = list(FACTORIES)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def covers(*ids):
    COVERED.update(ids)
    return lambda f: f


def test_every_row_of_the_page_is_covered():
    rows = set(re.findall(r"^\| `([a-z0-9-]+)` \|", PAGE.read_text(), flags=re.M))
    assert rows, "no rows found in docs/errors.md"
    assert rows == COVERED, (sorted(rows - COVERED), sorted(COVERED - rows))


# -- fixtures -------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def char_tokenizer():
    """Printable ASCII, one token per character, plus <unk> and <eos>: 97 tokens, below VOCAB."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 127)]
    vocab = {c: i for i, c in enumerate(chars)} | {"<unk>": len(chars), "<eos>": len(chars) + 1}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>")
    assert len(tok) < VOCAB
    return tok


@pytest.fixture
def folder(tmp_path, char_tokenizer):
    """``folder(family, name, tokenizer=..., **save_kw)``: a tiny model saved with a tokenizer."""
    def make(family="llama-gqa", name="model", tokenizer=None, edit=None, **save_kw):
        model = FACTORIES[family]()
        if edit is not None:
            edit(model)
        path = tmp_path / name
        model.save_pretrained(path, **save_kw)
        (tokenizer or char_tokenizer).save_pretrained(path)
        return path
    return make


@pytest.fixture
def calib(tmp_path):
    p = tmp_path / "calib.txt"
    p.write_text(" ".join(f"The quick brown fox {i} jumps over the lazy dog." for i in range(60)))
    return p


def prune_args(model, out, calib, *extra, method="wanda-sp"):
    return ["prune", str(model), "--sparsity", "0.3", "--method", method, "--calib", str(calib), "--nsamples", "2",
            "--seqlen", "16", "--eval", "", "--mlp-multiple", "1", "--output", str(out), "-q", *extra]


def run(argv, capsys) -> tuple[int, str]:
    """Exit status and the last line of stderr (the error line)."""
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert not any(l.startswith("Traceback") for l in err)
    return rc, err[-1] if err else ""


def refused(argv, capsys, pattern, rc=2) -> str:
    code, line = run(argv, capsys)
    assert code == rc, (code, line)
    assert line.startswith("structprune: error: "), line
    assert re.search(pattern, line), line
    return line


def no_leftovers(out: Path):
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.partial")]


# -- options and values ------------------------------------------------------------------------------

@covers("method-unknown", "sparsity-range", "allocation-unknown", "allocation-method", "knob-ignored",
        "integer", "positive", "seqlen-min", "sens-nsamples", "damp", "knob-value", "activation-budget",
        "uniform-widths")
@pytest.mark.parametrize("kw,pattern", [
    ({"method": "sparsegpt"}, r"unknown method 'sparsegpt': choose one of .*structprune"),
    ({"sparsity": 1.0}, r"sparsity must be in \[0, 1\), got 1\.0"),
    ({"sparsity": math.nan}, r"sparsity must be in \[0, 1\), got nan"),
    ({"allocation": "greedy"}, r"unknown allocation 'greedy': choose one of uniform, owl, threshold, softmax"),
    ({"allocation": "owl"}, r"allocation 'owl' is not available for method 'structprune': it supports "
                            r"softmax, threshold, uniform"),
    ({"method": "wanda-sp", "temperature": 0.5}, r"temperature=0\.5 is ignored by method 'wanda-sp' with allocation "
                                                 r"'uniform' \(read by: structprune \(softmax\)\); leave it at its "
                                                 r"default 0\.03125"),
    ({"iterations": 1.5}, r"iterations must be an integer, got 1\.5"),
    ({"nsamples": 0}, r"nsamples must be a positive integer, got 0"),
    ({"seqlen": 1}, r"seqlen must be at least 2, got 1"),
    ({"sens_nsamples": -1}, r"sens_nsamples must be >= 0 \(0: all calibration windows\), got -1"),
    ({"damp": 0.0}, r"damp must be finite and > 0 \(e\.g\. 0\.01\), got 0\.0"),
    ({"temperature": -1.0}, r"temperature must be >= 0 \(inf allowed\), got -1\.0"),
    ({"rho": math.inf}, r"rho must be finite and >= 0, got inf"),
    ({"r_min": 1.0}, r"r_min must be in \[0, 1\), got 1\.0"),
    ({"target": "best"}, r"unknown target 'best': choose one of dense, own"),
    ({"select": "first"}, r"unknown select 'first': choose one of best, last"),
    ({"method": "global", "global_score": "l2"}, r"unknown global_score 'l2': choose one of taylor, fisher"),
    ({"method": "wanda-sp", "allocation": "owl", "owl_lambda": -1.0}, r"owl_lambda must be finite and >= 0"),
    ({"method": "wanda-sp", "allocation": "owl", "owl_m": 0.0}, r"owl_m must be finite and > 0"),
    ({"activation_budget": "lots"}, r"activation_budget must be a size such as 4GiB, 512M or inf, got 'lots'"),
    ({"uniform_widths": True, "allocation": "softmax"}, r"uniform_widths needs allocation 'uniform', got 'softmax'"),
])
def test_config_values_are_refused(kw, pattern):
    with pytest.raises(StructPruneError, match=pattern):
        PruneConfig(**kw)


@covers("cli-counts", "shard-size", "device-cuda")
@pytest.mark.parametrize("flag,value,pattern", [
    ("--nsamples", "0", r"--nsamples must be at least 1, got 0"),
    ("--seqlen", "1", r"--seqlen must be at least 2, got 1"),
    ("--eval-limit", "-2", r"--eval-limit must be >= 0 \(0: every window\), got -2"),
    ("--max-shard-size", "big", r"max_shard_size 'big' is not a size such as 2GB, 500MB or 1GiB"),
    ("--device", "cuda", r"--device cuda requested but no CUDA GPU is available"),
])
def test_cli_values_are_refused(folder, calib, tmp_path, capsys, flag, value, pattern):
    if flag == "--device" and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    out = tmp_path / "out"
    args = prune_args(folder(), out, calib)
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args += [flag, value]
    refused(args, capsys, pattern)
    no_leftovers(out)


@covers("sparsity-range")
def test_cli_sparsity_out_of_range(folder, calib, tmp_path, capsys):
    args = prune_args(folder(), tmp_path / "out", calib)
    args[args.index("--sparsity") + 1] = "1.5"
    refused(args, capsys, r"sparsity must be in \[0, 1\), got 1\.5")


@covers("global-streamed")
def test_global_is_refused_on_a_checkpoint(folder, tmp_path):
    with pytest.raises(StructPruneError, match=r"the 'global' reference needs the whole model in memory"):
        api.prune_checkpoint(folder(), tmp_path / "out", calib_ids(2, 16), method="global", device="cpu",
                             nsamples=2, seqlen=16)


# -- targets and numerics (per family) ---------------------------------------------------------------

@covers("unreachable")
@pytest.mark.parametrize("family", FAMILIES)
def test_unreachable_target(family, folder, calib, tmp_path, capsys):
    out = tmp_path / "out"
    args = prune_args(folder(family), out, calib)
    args[args.index("--sparsity") + 1] = "0.97"
    refused(args, capsys, r"sparsity 0\.97 cannot be reached by wanda-sp: .*largest reachable sparsity is 0\.\d{4}; "
                          r"ask for at most that, or lower mlp_multiple")
    no_leftovers(out)


@covers("missed-target")
@pytest.mark.parametrize("family", FAMILIES)
def test_missed_target(family, monkeypatch):
    monkeypatch.setitem(api.METHODS, "wanda-sp", lambda run: [])
    with pytest.raises(StructPruneError, match=r"wanda-sp missed its target: target 0\.4, achieved 0\.0000, more "
                                               r"than one removal step \(0\.\d{4}\) apart"):
        api.prune(FACTORIES[family](), calib_ids(2, 16), device="cpu", progress=False, method="wanda-sp",
                  sparsity=0.4, nsamples=2, seqlen=16)


@covers("sensitivity-nonfinite")
@pytest.mark.parametrize("family", FAMILIES)
def test_nonfinite_sensitivity(family):
    model = FACTORIES[family]()
    with torch.no_grad():
        model.get_output_embeddings().weight[0, 0] = math.inf
    with pytest.raises(StructPruneError, match=r"sensitivity of layer \d+ (attn|mlp) is .*not finite.*: the loss "
                                               r"gradient reaching it is NaN/Inf"):
        api.prune(model, calib_ids(2, 16), device="cpu", progress=False, sparsity=0.3, nsamples=2, seqlen=16)


def _nan_in_first_mlp(model):
    from structprune.adapters import get_adapter

    a = get_adapter(model)
    with torch.no_grad():
        a.mlp_linears(a.layers()[0])[0][0].weight[0, 0] = math.nan


@covers("weights-nonfinite")
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["wanda-sp", "magnitude-sp"])
def test_nonfinite_weights(family, method, folder, calib, tmp_path, capsys):
    out = tmp_path / "out"
    refused(prune_args(folder(family, edit=_nan_in_first_mlp), out, calib, method=method), capsys,
            r"layer 0: \S+ holds NaN or Inf weights; the checkpoint is corrupt")
    no_leftovers(out)


def _nan_embeddings(model):
    # The decoder layers' weights are fine; their inputs (and so their statistics) are not.
    with torch.no_grad():
        model.get_input_embeddings().weight.fill_(math.nan)


@covers("statistics-nonfinite")
@pytest.mark.parametrize("family", FAMILIES)
def test_nonfinite_statistics(family, folder, calib, tmp_path, capsys):
    out = tmp_path / "out"
    refused(prune_args(folder(family, edit=_nan_embeddings), out, calib), capsys,
            r"NaN or Inf in calibration statistics \(\w+\) of layer 0 \w+: check the calibration text and the model "
            r"weights")
    no_leftovers(out)


@covers("seqlen-context")
@pytest.mark.parametrize("family", FAMILIES)
def test_seqlen_beyond_context(family, folder, calib, tmp_path, capsys, monkeypatch):
    import structprune.models.loading as loading

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("loaded the weights first"))
    args = prune_args(folder(family), tmp_path / "out", calib)
    args[args.index("--seqlen") + 1] = "256"
    refused(args, capsys, r"--seqlen 256 exceeds the model's context of 128 tokens")
    with pytest.raises(StructPruneError, match=r"sequence length 256 exceeds the model's context of 128 tokens"):
        api.prune(FACTORIES[family](), calib_ids(2, 256), device="cpu", nsamples=2, seqlen=256)


@covers("calib-ids", "calib-shape", "calib-none")
@pytest.mark.parametrize("family", FAMILIES)
def test_bad_calibration_tensors(family):
    model = FACTORIES[family]()
    kw = dict(device="cpu", progress=False, nsamples=2, seqlen=16)
    with pytest.raises(StructPruneError, match=rf"calibration token ids must lie in \[0, {VOCAB}\); is it the "
                                               r"model's tokenizer\?"):
        api.prune(model, calib_ids(2, 16) + VOCAB, **kw)
    with pytest.raises(StructPruneError, match=r"calibration must be \[nsamples, seqlen\] token ids, got shape \(16,\)"):
        api.prune(model, calib_ids(2, 16)[0], **kw)
    with pytest.raises(StructPruneError, match=r"pass calibration token ids or a tokenizer to draw them with"):
        api.prune(model, **kw)


# -- the model's files ------------------------------------------------------------------------------

@covers("model-not-found")
def test_model_not_found(tmp_path, calib, capsys):
    refused(prune_args(tmp_path / "nope", tmp_path / "out", calib), capsys,
            r"model path not found: .*nope; check the path or use smollm2-135m")


@covers("no-config")
def test_folder_without_config(tmp_path, calib, capsys):
    (tmp_path / "empty").mkdir()
    refused(prune_args(tmp_path / "empty", tmp_path / "out", calib), capsys,
            r"empty is a folder without config\.json; pass a Hugging Face model folder")


@covers("unsupported-architecture")
def test_unsupported_architecture_is_refused_from_the_config(tmp_path, calib, capsys, char_tokenizer, monkeypatch):
    from transformers import GPT2Config, GPT2LMHeadModel

    import structprune.data.calibration as calibration

    path = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2, n_positions=64)).save_pretrained(path)
    char_tokenizer.save_pretrained(path)
    monkeypatch.setattr(calibration, "get_calibration", lambda *a, **k: pytest.fail("read the calibration first"))
    refused(prune_args(path, tmp_path / "out", calib), capsys,
            r"unsupported architecture 'gpt2': StructPrune supports .*llama.*opt.*qwen2")


@covers("no-model-type")
def test_config_without_model_type(folder, tmp_path, calib, capsys):
    path = folder()
    cfg = json.loads((path / "config.json").read_text())
    del cfg["model_type"], cfg["architectures"]
    (path / "config.json").write_text(json.dumps(cfg))
    refused(prune_args(path, tmp_path / "out", calib), capsys,
            r"could not load model from .*: Unrecognized model in .*\. Should have a `model_type` key in its "
            r"config\.json")


@covers("tokenizer-mismatch")
@pytest.mark.parametrize("family", FAMILIES)
def test_tokenizer_of_another_model(family, folder, byte_tokenizer, calib, tmp_path, capsys):
    out = tmp_path / "out"
    refused(prune_args(folder(family, tokenizer=byte_tokenizer), out, calib), capsys,
            rf"the tokenizer has 25\d tokens but the model embeds only {VOCAB}: it is not this "
            r"model's tokenizer")
    no_leftovers(out)
    with pytest.raises(StructPruneError, match=r"the tokenizer has \d+ tokens but the model embeds only"):
        api.prune(FACTORIES[family](), tokenizer=byte_tokenizer, device="cpu", nsamples=2, seqlen=16)


def _sharded(folder, family):
    path = folder(family, max_shard_size="20KB")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    return path, index


@covers("shard-truncated")
@pytest.mark.parametrize("family", FAMILIES)
def test_truncated_shard(family, folder, calib, tmp_path, capsys):
    path = folder(family)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[:len(data) // 2])
    out = tmp_path / "out"
    refused(prune_args(path, out, calib), capsys, r"weights file .*model\.safetensors is truncated or corrupt \(")
    no_leftovers(out)


@covers("shard-missing")
@pytest.mark.parametrize("family", FAMILIES)
def test_missing_shard(family, folder, calib, tmp_path, capsys):
    path, index = _sharded(folder, family)
    gone = sorted(set(index["weight_map"].values()))[1]
    (path / gone).unlink()
    refused(prune_args(path, tmp_path / "out", calib), capsys,
            rf"weights shard .*{re.escape(gone)} named in .*model\.safetensors\.index\.json is missing")


@covers("shard-escape")
@pytest.mark.parametrize("family", FAMILIES)
def test_shard_name_leaving_the_folder(family, folder, calib, tmp_path, capsys):
    from structprune import load_pruned

    path, index = _sharded(folder, family)
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = "../../etc/passwd"
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    pattern = r"model\.safetensors\.index\.json names the shard '\.\./\.\./etc/passwd', a path outside the folder; " \
              r"refusing to read it"
    refused(prune_args(path, tmp_path / "out", calib), capsys, pattern)
    with pytest.raises(StructPruneError, match=pattern):
        load_pruned(path)


@covers("index-invalid")
def test_index_not_json(folder, calib, tmp_path, capsys):
    path, _ = _sharded(folder, "llama-gqa")
    (path / "model.safetensors.index.json").write_text("{not json")
    refused(prune_args(path, tmp_path / "out", calib), capsys,
            r"model\.safetensors\.index\.json is not a valid safetensors index \(")


@covers("tensor-missing")
@pytest.mark.parametrize("family", FAMILIES)
def test_checkpoint_lacking_a_tensor(family, folder, calib, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    path = folder(family)
    sd = load_file(path / "model.safetensors")
    victim = next(k for k in sd if "layers.1." in k)
    del sd[victim]
    save_file(sd, path / "model.safetensors", metadata={"format": "pt"})
    refused(prune_args(path, tmp_path / "out", calib), capsys,
            rf"the weights in .* lack 1 tensor\(s\) the model needs: \['{re.escape(victim)}'\]")


@covers("pickle")
def test_pickled_weights_are_never_unpickled(folder, calib, tmp_path, capsys):
    path = folder("llama-gqa")
    (path / "model.safetensors").unlink()
    marker = tmp_path / "PWNED"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    torch.save({"model.embed_tokens.weight": Payload()}, path / "pytorch_model.bin")
    out = tmp_path / "out"
    refused(prune_args(path, out, calib), capsys,
            r"the pickled weights in .* hold objects other than tensors; StructPrune never unpickles those")
    assert not marker.exists()
    no_leftovers(out)


def _remote_code_folder(folder, tmp_path, model_type, module="evil"):
    path = folder()
    cfg = json.loads((path / "config.json").read_text())
    cfg["model_type"] = model_type
    cfg["auto_map"] = {"AutoConfig": f"{module}.EvilConfig", "AutoModelForCausalLM": f"{module}.EvilModel"}
    (path / "config.json").write_text(json.dumps(cfg))
    marker = tmp_path / "RAN"
    (path / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    return path, marker


@covers("remote-code")
def test_remote_code_never_runs_unasked(folder, calib, tmp_path, capsys):
    path, marker = _remote_code_folder(folder, tmp_path, "evil_llama")
    refused(prune_args(path, tmp_path / "out", calib), capsys,
            r"model needs its own code to load \(config\.json's auto_map\) and StructPrune runs none unless asked: "
            r"pass --trust-remote-code")
    assert not marker.exists()
    # A known family with an auto_map: the stock code is used, the folder's never runs.
    path, marker = _remote_code_folder(folder, tmp_path, "llama")
    assert run(prune_args(path, tmp_path / "out2", calib), capsys)[0] == 0
    assert not marker.exists()


@covers("auto-map-escape")
@pytest.mark.parametrize("module", ["../../evil", "someone/repo--evil"])
def test_auto_map_outside_the_folder_is_refused_even_when_trusted(folder, calib, tmp_path, capsys, module):
    path, marker = _remote_code_folder(folder, tmp_path, "evil_llama", module=module)
    refused(prune_args(path, tmp_path / "out", calib, "--trust-remote-code"), capsys,
            rf"config\.json maps AutoConfig to '{re.escape(module)}\.EvilConfig', code outside the folder; refusing")
    assert not marker.exists()


# -- calibration text -------------------------------------------------------------------------------

@covers("calib-not-found", "calib-empty", "calib-binary", "calib-non-utf8", "calib-nul", "calib-too-short",
        "calib-json-invalid", "calib-json-items", "corpus-unknown")
@pytest.mark.parametrize("name,content,pattern", [
    ("missing.txt", None, r"text file not found: .*missing\.txt; pass an existing \.txt/\.json/\.jsonl\(\.gz\) file"),
    ("empty.txt", b"  \n\n ", r"empty\.txt is empty; pass a file with text in it"),
    ("ls", bytes(range(256)) * 64, r"ls is not UTF-8 text \(UnicodeDecodeError: is it a binary file\?\); pass a "
                                   r"plain text or JSON file"),
    ("latin1.txt", "café crème brûlée ".encode("latin-1") * 50, r"latin1\.txt is not UTF-8 text \(UnicodeDecodeError"),
    ("zeros.txt", b"\x00" * 4096, r"zeros\.txt is not UTF-8 text \(it holds NUL bytes: is it a binary file\?\)"),
    ("short.txt", b"too short", r"calibration text '.*short\.txt' has 9 tokens, fewer than seqlen\+1=17; use a "
                                r"longer text or a shorter --seqlen"),
    ("bad.json", b"[1, 2", r"bad\.json is not valid JSON or JSON lines \(.*\); pass a \.txt file for plain text"),
    ("items.jsonl", b'{"title": "no text"}\n', r"items\.jsonl: expected JSON strings or objects with a 'text' field"),
    ("wikitext3", None, r"unknown corpus 'wikitext3'; use one of wikitext2, ptb, c4 or a path to a "
                        r"\.txt/\.json/\.jsonl file"),
])
def test_bad_calibration_text(folder, tmp_path, capsys, monkeypatch, name, content, pattern):
    import structprune.models.loading as loading

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("loaded the weights first"))
    path = tmp_path / name if name != "wikitext3" else name
    if content is not None:
        path.write_bytes(content)
    out = tmp_path / "sub" / "out"
    refused(prune_args(folder(), out, path), capsys, pattern)
    assert not (tmp_path / "sub").exists()


# -- the output -------------------------------------------------------------------------------------

@covers("output-exists")
def test_output_exists(folder, calib, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    refused(prune_args(folder(), out, calib), capsys,
            r"output path .*out exists and is not empty; pass --overwrite or choose another")
    assert (out / "mine.txt").read_text() == "keep"


@covers("output-unwritable")
def test_output_not_writable(folder, calib, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    refused(prune_args(folder(), blocker / "out", calib), capsys,
            rf"cannot write the output under {re.escape(str(blocker))}: not a writable folder")
    if os.geteuid() != 0:  # root writes anywhere: the permission case needs an ordinary user
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        refused(prune_args(folder(), locked / "out", calib), capsys, r"cannot write the output under .*locked")


def _full_disk(monkeypatch, where):
    """Make one writer fail as a full disk does, after writing part of its file."""
    def fail(path):
        Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    if where == "shard":  # streamed path: ShardWriter closing a shard
        import structprune.export.shards as shards

        monkeypatch.setattr(shards, "_write_shard", lambda tmp, *a: fail(tmp))
    elif where == "save_pretrained":  # in-memory path: transformers -> safetensors
        import transformers.modeling_utils as mu

        monkeypatch.setattr(mu, "safe_save_file", lambda t, path, metadata=None: fail(path))
    else:  # report.json, the last file written
        import structprune.export as export

        monkeypatch.setattr(export, "write_json", lambda path, obj: fail(path))


@covers("disk-full")
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("where", ["shard", "save_pretrained", "report"])
def test_full_disk_while_saving(family, where, folder, calib, tmp_path, capsys, monkeypatch):
    model = folder(family)
    _full_disk(monkeypatch, where)
    out = tmp_path / "deep" / "out"
    extra = ("--in-memory",) if where == "save_pretrained" else ()
    line = refused(prune_args(model, out, calib, *extra), capsys,
                   r"No space left on device.*\(free some space or write elsewhere\).*; nothing was written to .*out$")
    assert line.count("No space left") == 1
    assert not (tmp_path / "deep").exists()


@covers("interrupt-saving")
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("path", ["streamed", "in-memory"])
def test_ctrl_c_while_saving(family, path, folder, calib, tmp_path, capsys, monkeypatch):
    import structprune.export.writer as writer

    real = writer.write_export_files

    def interrupted(export_cfg, base, out, *a, **k):  # config and tokenizer written, then Ctrl-C
        real(export_cfg, base, out, *a, **k)
        assert any(Path(out).iterdir())
        raise KeyboardInterrupt
    monkeypatch.setattr(writer, "write_export_files", interrupted)
    out = tmp_path / "deep" / "out"
    extra = ("--in-memory",) if path == "in-memory" else ()
    code, line = run(prune_args(folder(family), out, calib, *extra), capsys)
    assert code == 130 and line == "structprune: interrupted; no output was written"
    assert not (tmp_path / "deep").exists()


# -- exports read back --------------------------------------------------------------------------------

def _per_layer_export(family, tmp_path):
    """A per-layer (custom) export: layers cut to different MLP widths."""
    from structprune.adapters import get_adapter
    from structprune.adapters.base import LayerPlan
    from structprune.export import save_pruned
    from structprune.surgery import apply_layer_plan

    model = FACTORIES[family]()
    a = get_adapter(model)
    for i, layer in enumerate(a.layers()):
        s, m = a.attention_shape(layer), a.mlp_shape(layer)
        apply_layer_plan(a, layer, LayerPlan(list(range(s.num_heads)), list(range(s.num_kv_heads)),
                                             list(range(m.channels - 3 * (i + 1)))))
    out = tmp_path / f"export-{family}"
    export = save_pruned(model, None, out, report={})
    assert export.format == "custom"
    return out


@covers("modeling-modified", "modeling-unverifiable", "modeling-missing", "auto-map-export")
@pytest.mark.parametrize("family", FAMILIES)
def test_shipped_modeling_file_is_verified(family, tmp_path):
    from structprune import load_pruned
    from structprune.export.loader import MODELING_NAME
    from structprune.provenance import file_sha256

    out = _per_layer_export(family, tmp_path)
    cfg = json.loads((out / "config.json").read_text())
    recorded = cfg["structprune"]["modeling_sha256"]
    assert recorded == file_sha256(out / MODELING_NAME)
    assert json.loads((out / "report.json").read_text())["export"]["modeling_sha256"] == recorded
    load_pruned(out)
    load_pruned(out, trust_remote_code=True)

    original = (out / MODELING_NAME).read_text()
    (out / MODELING_NAME).write_text(original + "\nimport os  # added later\n")
    for trust in (False, True):
        with pytest.raises(StructPruneError, match=rf"{MODELING_NAME} was modified after the export \(SHA-256 "
                                                   r"[0-9a-f]{12}\.\.\., recorded [0-9a-f]{12}\.\.\.\): refusing to "
                                                   r"load it; restore the file or re-export the model"):
            load_pruned(out, trust_remote_code=trust)
    (out / MODELING_NAME).write_text(original)

    del cfg["structprune"]["modeling_sha256"]
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(StructPruneError, match=rf"records no SHA-256 of {MODELING_NAME}, so the file cannot be "
                                               r"verified before it runs"):
        load_pruned(out, trust_remote_code=True)
    load_pruned(out)  # the packaged code runs, not the folder's

    cfg["structprune"]["modeling_sha256"] = recorded
    cfg["auto_map"]["AutoModelForCausalLM"] = "evil.EvilModel"
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(StructPruneError, match=rf"maps AutoModelForCausalLM to 'evil\.EvilModel', code outside "
                                               rf"{MODELING_NAME}; refusing to load it"):
        load_pruned(out)

    del cfg["auto_map"]["AutoModelForCausalLM"]
    cfg["auto_map"]["AutoModelForCausalLM"] = "modeling_structprune." + cfg["architectures"][0]
    (out / "config.json").write_text(json.dumps(cfg))
    (out / MODELING_NAME).unlink()
    with pytest.raises(StructPruneError, match=rf"{MODELING_NAME} is missing: this per-layer export cannot load "
                                               r"with trust_remote_code"):
        load_pruned(out, trust_remote_code=True)


@covers("export-widths", "export-weights")
@pytest.mark.parametrize("family", FAMILIES)
def test_export_whose_config_disagrees_with_its_weights(family, tmp_path):
    from safetensors.torch import load_file, save_file

    from structprune import load_pruned

    out = _per_layer_export(family, tmp_path)
    cfg = json.loads((out / "config.json").read_text())
    cfg["layer_intermediate_size"][0] += 1
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(StructPruneError, match=r"config\.json's widths disagree with the weights in"):
        load_pruned(out)
    cfg["layer_intermediate_size"][0] -= 1
    (out / "config.json").write_text(json.dumps(cfg))
    sd = load_file(out / "model.safetensors")
    sd["model.extra.weight"] = torch.zeros(2)
    save_file(sd, out / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(StructPruneError, match=r"weights in .* do not match its config\.json: .*unexpected"):
        load_pruned(out)


@covers("export-not-model")
def test_load_pruned_of_something_else(tmp_path):
    from structprune import load_pruned

    with pytest.raises(StructPruneError, match=r"is not a folder; pass a folder written by `structprune prune --output`"):
        load_pruned(tmp_path / "nothing")
    with pytest.raises(StructPruneError, match=r"is not a model folder \(no config\.json\)"):
        load_pruned(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(StructPruneError, match=r"config\.json has no model_type: not a Hugging Face model folder"):
        load_pruned(tmp_path)


# -- no pickle, no unasked remote code, anywhere in the source -------------------------------------------

@covers("security-source")
def test_the_source_never_unpickles_nor_trusts_remote_code_by_itself():
    import ast

    src = Path(__file__).resolve().parents[1] / "src" / "structprune"
    unpicklers = {"load", "loads", "Unpickler"}  # torch.load, pickle.load(s), numpy.load, joblib.load
    for path in src.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            owner = ast.unparse(node.func.value)
            if node.func.attr in unpicklers:
                assert owner not in ("torch", "pickle", "np", "numpy", "joblib", "dill"), (path, ast.unparse(node))
            for kw in node.keywords:  # remote code runs only when the caller's own flag says so
                if kw.arg == "trust_remote_code":
                    assert not isinstance(kw.value, ast.Constant) or kw.value.value is False, (path, ast.unparse(node))


@covers("disk-full")
def test_safetensors_wrapped_os_error_is_named(folder, calib, tmp_path, capsys, monkeypatch):
    """safetensors reports a failed write as its own error with the OS code in the text (a real
    `ulimit -f` run gave "I/O error: File too large (os error 27)"): it is one line naming the OS error."""
    import transformers.modeling_utils as mu
    from safetensors import SafetensorError

    def too_large(t, path, metadata=None):
        Path(path).write_bytes(b"partial")
        raise SafetensorError("Error while serializing: I/O error: File too large (os error 27)")
    # The in-memory path writes through safetensors (the streamed one writes its shards itself).
    model = folder()  # written before the failure is injected
    monkeypatch.setattr(mu, "safe_save_file", too_large)
    out = tmp_path / "deep" / "out"
    refused(prune_args(model, out, calib, "--in-memory"), capsys,
            r"File too large \(the file system or a limit refuses files this large; write "
            r"elsewhere\); nothing was written to .*out$")
    assert not (tmp_path / "deep").exists()


# -- resuming a killed run ----------------------------------------------------------------------

@covers("resume-partial-exists")
@pytest.mark.parametrize("family", FAMILIES)
def test_leftover_partial_run_needs_resume_or_overwrite(family, folder, calib, tmp_path, capsys):
    out = tmp_path / "out"
    (tmp_path / ".out.partial" / ".resume").mkdir(parents=True)  # what a killed run leaves
    refused(prune_args(folder(family), out, calib), capsys,
            r"an interrupted run of this command left \S+\.out\.partial: continue it with --resume")
    assert (tmp_path / ".out.partial").is_dir() and not out.exists()  # kept for --resume


@covers("resume-other-run")
@pytest.mark.parametrize("family", FAMILIES)
def test_resume_of_another_runs_journal_is_refused(family, folder, calib, tmp_path, capsys):
    from structprune.engine.journal import RunJournal

    out = tmp_path / "out"
    RunJournal(tmp_path / ".out.partial" / ".resume", {"config": {"sparsity": 0.9}})
    refused([*prune_args(folder(family), out, calib), "--resume"], capsys,
            r"the interrupted run in \S+ was started with a different .*config.*; run the same command to resume "
            r"it, or start afresh without --resume")
    assert (tmp_path / ".out.partial" / ".resume" / "run.json").is_file()  # the killed run's work is kept


@covers("resume-in-memory")
def test_resume_of_an_in_memory_run_is_refused(folder, calib, tmp_path, capsys):
    refused([*prune_args(folder(), tmp_path / "out", calib), "--in-memory", "--resume"], capsys,
            r"--resume continues a run streamed from a checkpoint folder; this run holds the model in memory")


# -- zero-shot tasks --------------------------------------------------------------------------------

def _need_lm_eval():
    pytest.importorskip("lm_eval", reason="lm-eval not installed: pip install -e '.[eval]' (.ci/run installs it)")


@covers("lm-eval-missing")
def test_zero_shot_without_lm_eval_is_refused(folder, calib, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval raises ImportError
    out = tmp_path / "out"
    args = prune_args(folder(), out, calib)
    args[args.index("--eval") + 1] = "piqa"
    refused(args, capsys, r"zero-shot evaluation needs lm-evaluation-harness, which is not installed: "
                          r"pip install 'structprune\[eval\]' \(lm-eval>=0\.4\.10\)$")
    no_leftovers(out)


@covers("task-unknown")
@pytest.mark.lm_eval
def test_unknown_zero_shot_task_is_refused(folder, calib, tmp_path, capsys):
    _need_lm_eval()
    out = tmp_path / "out"
    args = prune_args(folder(), out, calib)
    args[args.index("--eval") + 1] = "piqa,arc_easyy"
    refused(args, capsys, r"unknown zero-shot task\(s\): arc_easyy; use lm-eval task names, e\.g\. boolq,piqa,")
    no_leftovers(out)


@covers("task-data-altered")
@pytest.mark.lm_eval
def test_altered_task_file_is_refused(folder, tmp_path, capsys, monkeypatch):
    import gzip

    from structprune.data import tasks as task_data

    bundled = tmp_path / "bundled"
    bundled.mkdir()
    src = task_data.bundled_task_path("arc_easy")
    (bundled / src.name).write_bytes(gzip.compress(gzip.decompress(src.read_bytes()) + b"\n{}\n"))
    monkeypatch.setattr(task_data, "BUNDLED_DIR", bundled)
    monkeypatch.setenv(task_data.ZEROSHOT_DATA_ENV, str(tmp_path))
    with pytest.raises(StructPruneError, match=r"the packaged task data \S+arc_easy_test\.jsonl\.gz fails its SHA-256 "
                                               r"check \(got [0-9a-f]{12}\.\.\., want 6ce8fb7b4baa\.\.\.\): reinstall"):
        task_data.load_task_data("arc_easy")
    _need_lm_eval()
    refused(["eval", folder(), "--zero-shot", "arc_easy", "-q"], capsys, r"fails its SHA-256 check")


@covers("task-data-folder")
@pytest.mark.lm_eval
def test_task_folder_that_is_no_folder_is_refused(folder, tmp_path, capsys):
    _need_lm_eval()
    refused(["eval", folder(), "--zero-shot", "piqa", "--zero-shot-data", tmp_path / "nope", "-q"], capsys,
            r"--zero-shot-data \S+nope is not a folder; pass a folder holding the task files \(boolq_validation")


@covers("openbookqa-absent")
@pytest.mark.lm_eval
def test_openbookqa_without_a_file_offline_is_refused(folder, tmp_path, capsys, monkeypatch):
    _need_lm_eval()
    import lm_eval

    def offline(*a, **k):  # what lm-eval's hub download raises with no network
        raise ConnectionError("Couldn't reach 'allenai/openbookqa' on the Hub")

    monkeypatch.setattr(lm_eval, "simple_evaluate", offline)
    refused(["eval", folder(), "--zero-shot", "openbookqa", "--zero-shot-data", tmp_path, "--zero-shot-limit", "0",
             "-q"], capsys,
            r"OpenBookQA does not ship with StructPrune \(no licence for its data was found\): put openbookqa_test\.jsonl"
            r" .* or run where the Hugging Face hub is reachable \(ConnectionError\)$")


# -- memory limits (engine/budget.py) -------------------------------------------------------------

@covers("memory-too-small")
@pytest.mark.parametrize("how", ["--max-memory", "cgroup"])
def test_a_limit_too_small_for_one_layer_is_refused_before_any_work(how, folder, calib, tmp_path, capsys,
                                                                     monkeypatch):
    """The limit comes from --max-memory or the container (an injected cgroup v1 limit): either way the
    run stops before reading any weight, with the estimate and the limit in one line."""
    import structprune.engine.budget as budget
    from structprune.models import checkpoint

    read = []
    real = checkpoint.CheckpointReader.get
    monkeypatch.setattr(checkpoint.CheckpointReader, "get", lambda self, *a, **k: read.append(1) or real(self, *a, **k))
    out = tmp_path / "deep" / "out"
    if how == "cgroup":
        monkeypatch.setattr(budget, "cgroup_limit", lambda: (300 * 2**20, "cgroup v1 /sys/fs/cgroup/memory/x/memory.limit_in_bytes"))
        extra = ()
    else:
        extra = ("--max-memory", "300MiB")
    line = refused(prune_args(folder(), out, calib, *extra), capsys,
                   r"not enough memory for one layer: this run needs about \d+\.\d\d GiB \(process now \d+\.\d\d GiB, "
                   r"largest layer's work \d+\.\d\d GiB, activations at least 0\.06 GiB\) but may use 0\.29 GiB \("
                   + ("--max-memory" if how == "--max-memory" else r"cgroup v1 \S+memory\.limit_in_bytes") + r"\)")
    assert read == [] and not (tmp_path / "deep").exists()
    assert "raise the limit" in line


@covers("max-memory-value")
@pytest.mark.parametrize("value, pattern", [("lots", r"--max-memory 'lots' is not a size such as 6GiB"),
                                            ("0", r"--max-memory must be a positive size such as 6GiB, got '0'")])
def test_max_memory_value(value, pattern, folder, calib, tmp_path, capsys):
    refused(prune_args(folder(), tmp_path / "out", calib, "--max-memory", value), capsys, pattern)


@covers("max-memory-in-memory")
def test_max_memory_needs_a_streamed_run(folder, calib, tmp_path, capsys):
    refused(prune_args(folder(), tmp_path / "out", calib, "--in-memory", "--max-memory", "8GiB"), capsys,
            r"^structprune: error: --max-memory bounds a run streamed from a checkpoint folder")


# -- GGUF export (structprune export --format gguf, prune --gguf) ------------------------------------

@covers("gguf-type", "gguf-needs-llama-cpp", "gguf-output-exists", "gguf-output-suffix")
def test_gguf_options_are_refused(folder, calib, tmp_path, capsys, monkeypatch):
    from structprune.export import gguf as gguf_export

    src = folder("llama-gqa")
    refused(["export", src, "--type", "q3", "--output", tmp_path / "m.gguf"], capsys,
            r"unknown GGUF type 'q3': choose one of f32, f16, bf16, q8_0, q4_0, .*q4_k_m")
    monkeypatch.setattr(gguf_export, "llama_cpp_available", lambda: False)
    line = refused(["export", src, "--type", "q4_k_m", "--output", tmp_path / "m.gguf"], capsys,
                   r"GGUF type q4_k_m needs llama.cpp's quantizer \(llama-cpp-python\): pip install "
                   r"'structprune\[gguf\]' \(or write f32, f16, bf16, q8_0 without it\)")
    out = tmp_path / "out"  # prune --gguf: refused before anything is loaded or written
    assert refused(prune_args(src, out, calib, "--gguf", "f16,q4_k_m"), capsys, "needs llama.cpp") == line
    no_leftovers(out)
    (tmp_path / "there.gguf").write_bytes(b"x")
    refused(["export", src, "--output", tmp_path / "there.gguf"], capsys,
            r"output file .*there.gguf exists; pass --overwrite or choose another")
    refused(["export", src, "--output", tmp_path / "m.bin"], capsys, r"--output .*m.bin should end in .gguf")


@covers("gguf-family")
def test_gguf_of_a_family_llama_cpps_per_layer_graph_cannot_hold(folder, calib, tmp_path, capsys):
    refused(["export", folder("opt", "opt"), "--output", tmp_path / "m.gguf"], capsys,
            r"GGUF export supports the llama, mistral, qwen2 families \(llama.cpp's per-layer 'deci' graph is a "
            r"LLaMA block\); 'opt' is not one of them: convert this stock folder with llama.cpp's "
            r"convert_hf_to_gguf.py")
    refused(["export", _per_layer_export("opt", tmp_path), "--output", tmp_path / "m.gguf"], capsys,
            r"'opt' is not one of them: write it with --uniform-widths and convert that stock folder")
    out = tmp_path / "out"
    refused(prune_args(folder("opt", "opt2"), out, calib, "--gguf", "f16"), capsys, r"'opt' is not one of them")
    no_leftovers(out)


@covers("gguf-tokenizer-pre", "gguf-tokenizer-pre-unknown")
def test_gguf_of_a_tokenizer_llama_cpp_does_not_know(tmp_path, capsys):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(["a tiny corpus for a tiny tokenizer"] * 5,
                          trainers.BpeTrainer(vocab_size=VOCAB - 4, initial_alphabet=[]))
    src = _per_layer_export("llama-gqa", tmp_path)
    PreTrainedTokenizerFast(tokenizer_object=t).save_pretrained(src)
    refused(["export", src, "--output", tmp_path / "m.gguf"], capsys,
            r"llama.cpp does not know this tokenizer's pre-tokenizer \(its hash is not in llama.cpp's table\); "
            r"pass --tokenizer-pre NAME \(e.g. llama-bpe, qwen2, smollm, gpt-2\)")
    refused(["export", src, "--output", tmp_path / "m.gguf", "--tokenizer-pre", "gpt-3"], capsys,
            r"unknown --tokenizer-pre 'gpt-3': llama.cpp knows a.x-4.0, afmoe, ")
    assert not (tmp_path / "m.gguf").exists() and not list(tmp_path.glob(".m.gguf*"))


@covers("gguf-layer-without-mlp", "gguf-layer-0-without-heads", "gguf-heads-without-kv", "gguf-rope")
def test_gguf_layouts_llama_cpp_would_compute_differently():
    from structprune.export.gguf import Layout, check_expressible

    def layout(layers, rope=None):
        full = [{"heads": h, "kv_heads": k, "mlp": f, "qkv_bias": False, "o_bias": False, "mlp_bias": False}
                for h, k, f in layers]
        return Layout("llama", 64, 16, VOCAB, full, False, {"rope_parameters": rope or {"rope_type": "default"}})

    with pytest.raises(StructPruneError, match=r"layer 1 keeps attention but no MLP channel: llama.cpp's deci graph "
                                               r"then drops that layer's attention too; prune with --uniform-widths"):
        check_expressible(layout([(4, 2, 8), (2, 1, 0)]))
    with pytest.raises(StructPruneError, match=r"layer 0 keeps no attention head: llama.cpp derives the rope size "
                                               r"from layer 0; prune with --uniform-widths"):
        check_expressible(layout([(0, 0, 8), (2, 1, 8)]))
    with pytest.raises(StructPruneError, match=r"layer 1 has query heads but no KV heads; llama.cpp reads that as "
                                               r"Nemotron's linear attention"):
        check_expressible(layout([(4, 2, 8), (2, 0, 8)]))
    with pytest.raises(StructPruneError, match=r"rope type 'longrope' has no GGUF mapping here \(default, linear, "
                                               r"llama3, yarn\)"):
        check_expressible(layout([(4, 2, 8)], {"rope_type": "longrope"}))
    check_expressible(layout([(4, 2, 8), (0, 0, 8), (2, 1, 8)]))  # an attention-free layer is fine


# -- distributed runs (tests/test_distributed.py runs real ranks; here each check on its own) -------

@pytest.fixture
def two_ranks(monkeypatch):
    """engine/distributed.py as rank 0 of 2 would see it, with ``gather`` standing in for the ranks."""
    from structprune.engine import distributed

    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "rank", lambda: 0)
    return distributed


@covers("dist-chunks")
def test_fewer_chunks_than_ranks_is_refused(two_ranks):
    with pytest.raises(StructPruneError, match=r"^3 calibration windows in chunks of 4 make 1 chunks, fewer than the "
                                               r"2 ranks: use more windows \(--nsamples\), a smaller batch size"):
        two_ranks.check_chunks(3, 4)
    two_ranks.check_chunks(3, 2)  # 2 chunks for 2 ranks: fine


@covers("dist-disagree")
def test_ranks_that_disagree_are_refused(two_ranks, monkeypatch):
    monkeypatch.setattr(two_ranks, "gather_objects", lambda v: [v, "other"])
    with pytest.raises(StructPruneError, match=r"^ranks disagree on the calibration windows \(rank 1 differs from "
                                               r"rank 0\): every rank must see the same checkpoint"):
        two_ranks.check_same("abc", "the calibration windows")


@covers("dist-timeout-value")
def test_a_bad_collective_timeout_is_refused(monkeypatch):
    from structprune.engine import distributed

    for bad, what in (("soon", "a number of seconds"), ("-5", "a positive number of seconds")):
        monkeypatch.setenv("STRUCTPRUNE_DIST_TIMEOUT", bad)
        with pytest.raises(StructPruneError, match=rf"STRUCTPRUNE_DIST_TIMEOUT must be {what}, got '{bad}'"):
            distributed.timeout_seconds()


@covers("dist-rank-died")
def test_a_failed_collective_is_one_line_naming_the_dead_rank(two_ranks, monkeypatch):
    import os
    import socket
    import subprocess
    import sys

    import torch.distributed

    from structprune.errors import RankFailure

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid that no longer runs: rank 1's
    host = socket.gethostname()
    monkeypatch.setattr(two_ranks, "_PEERS", [(host, os.getpid()), (host, gone.pid)])

    def closed(*args, **kwargs):
        raise RuntimeError("[pair.cc:553] Connection closed by peer [127.0.0.1]:6042")
    monkeypatch.setattr(torch.distributed, "barrier", closed)
    with pytest.raises(RankFailure, match=r"^rank 0 of 2: a barrier failed: rank 1 died \(its process is gone: "
                                          r"killed, out of memory or crashed\) \[.*Connection closed by peer.*\]; "
                                          r"the partial output is kept"):
        two_ranks.barrier()
