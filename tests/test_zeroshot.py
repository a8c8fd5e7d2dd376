"""Zero-shot accuracy on the shipped task data (issue 29).

Without lm-eval: the packaged files and their SHA-256 checks, the source order, the seeded document
sample, the paired intervals. With lm-eval (``pip install -e ".[eval]"``; skipped with a named reason
otherwise, .ci/run installs it and runs them): the local task produces exactly the requests of
lm-eval's built-in task for the same documents, a real-data smoke run on a tiny model, and
``prune --eval`` with task names.
"""

from __future__ import annotations

import gzip
import json
import shutil

import pytest
import torch

from structprune.data import tasks as task_data
from structprune.data.tasks import BUNDLED_TASKS, TASK_FILES, load_task_data
from structprune.errors import StructPruneError
from structprune.eval.intervals import paired_difference, stratified_mean_difference
from structprune.eval.zeroshot import SHIPPED_TASKS, compare_zero_shot, select_documents

LM_EVAL_MISSING = "lm-eval not installed: pip install -e '.[eval]' (.ci/run installs it and runs these tests)"
ROWS = {"boolq": 3270, "piqa": 1838, "hellaswag": 10042, "winogrande": 1267, "arc_easy": 2376, "arc_challenge": 1172}


def _lm_eval():
    return pytest.importorskip("lm_eval", reason=LM_EVAL_MISSING)


# -- the shipped data ---------------------------------------------------------------------------

def test_six_sets_ship_and_pass_their_check(monkeypatch, tmp_path):
    monkeypatch.setenv(task_data.ZEROSHOT_DATA_ENV, str(tmp_path))  # an empty user folder: the packaged copy
    assert set(BUNDLED_TASKS) == set(SHIPPED_TASKS) == set(ROWS)
    for task, n in ROWS.items():
        td = load_task_data(task)
        assert td.source == "packaged" and len(td.rows) == n and td.sha256 == BUNDLED_TASKS[task]
        assert td.split == ("test" if task.startswith("arc") else "validation")
    first = json.loads(load_task_data("hellaswag").rows[0])
    assert first["activity_label"] == "Roof shingle removal" and first["label"] in ("3", 3)
    sums = (task_data.BUNDLED_DIR / "SHA256SUMS").read_text()
    for task, digest in BUNDLED_TASKS.items():
        assert f"{digest}  {TASK_FILES[task][0]}.jsonl" in sums
    readme = (task_data.BUNDLED_DIR / "README.md").read_text()
    for licence in ("MIT", "AFL-3.0", "CC BY 2.0", "CC BY-SA 3.0", "CC BY-SA 4.0"):
        assert licence in readme


def test_openbookqa_does_not_ship(monkeypatch, tmp_path):
    monkeypatch.setenv(task_data.ZEROSHOT_DATA_ENV, str(tmp_path))
    assert not list(task_data.BUNDLED_DIR.glob("openbookqa*"))
    assert load_task_data("openbookqa") is None  # only the hub (lm-eval's own task) can provide it


def test_altered_packaged_file_is_refused(monkeypatch, tmp_path):
    bundled = tmp_path / "bundled"
    bundled.mkdir()
    src = task_data.bundled_task_path("winogrande")
    rows = gzip.decompress(src.read_bytes()).decode().splitlines()
    rows[0] = rows[0].replace('"answer": "2"', '"answer": "1"')
    (bundled / src.name).write_bytes(gzip.compress(("\n".join(rows) + "\n").encode()))
    monkeypatch.setattr(task_data, "BUNDLED_DIR", bundled)
    monkeypatch.setenv(task_data.ZEROSHOT_DATA_ENV, str(tmp_path))  # no winogrande file there
    with pytest.raises(StructPruneError, match="fails its SHA-256 check") as e:
        load_task_data("winogrande")
    assert "\n" not in str(e.value) and "reinstall structprune" in str(e.value)


def test_user_folder_comes_first(monkeypatch, tmp_path):
    rows = ['{"sentence": "A _ b.", "option1": "x", "option2": "y", "answer": "1"}'] * 3
    (tmp_path / "winogrande_validation.jsonl").write_text("\n".join(rows) + "\n")
    td = load_task_data("winogrande", tmp_path)
    assert td.source == "folder" and len(td.rows) == 3
    monkeypatch.setenv(task_data.ZEROSHOT_DATA_ENV, str(tmp_path))
    assert load_task_data("winogrande").source == "folder"
    assert load_task_data("piqa").source == "packaged"  # a task the folder lacks: the next source
    with pytest.raises(StructPruneError, match="is not a folder"):
        load_task_data("piqa", tmp_path / "missing")
    (tmp_path / "openbookqa_test.jsonl").write_text("[1, 2]\n")
    with pytest.raises(StructPruneError, match="line 1 is not a JSON object"):
        load_task_data("openbookqa")


def test_document_sample_is_seeded_and_spread():
    a = select_documents(10042, 500, 0, "hellaswag")
    assert a == select_documents(10042, 500, 0, "hellaswag") and a == sorted(set(a)) and len(a) == 500
    assert a != select_documents(10042, 500, 1, "hellaswag") and a != select_documents(10042, 500, 0, "piqa")
    assert sum(i >= 3243 for i in a) > 250  # lm-eval's first 500 would all be ActivityNet rows (< 3243)
    assert select_documents(1267, None, 0, "winogrande") == list(range(1267))
    assert select_documents(1267, 5000, 0, "winogrande") == list(range(1267))


def test_paired_differences():
    a = [1, 0, 1, 1, 0, 1, 0, 0, 1, 1]
    same = paired_difference(a, a)
    assert same.value == same.low == same.high == 0.0
    b = [0] * 10
    d = paired_difference(a, b)
    assert d.value == pytest.approx(0.6) and d.low < 0.6 < d.high and d.low >= 0.0
    flipped = paired_difference(b, a)
    assert flipped.value == pytest.approx(-0.6) and flipped.high <= 0.0
    m = stratified_mean_difference([(a, b), (b, b)])
    assert m.value == pytest.approx(0.3) and m.low < 0.3 < m.high
    with pytest.raises(ValueError):
        paired_difference(a, b[:5])
    # Paired beats unpaired: a difference shared by both models on every document has no spread.
    x = torch.randint(0, 2, (400,), generator=torch.Generator().manual_seed(0)).tolist()
    assert paired_difference(x, x).high - paired_difference(x, x).low == 0.0


def _result(docs, correct):
    t = {"primary": "acc", "value": sum(correct) / len(correct), "stderr": 0.1, "interval": [0.0, 1.0],
         "n": len(docs), "documents": docs, "correct": {"acc": correct}, "data": {}, "chance": 0.5}
    return {"tasks": {"piqa": t}, "mean": {"value": t["value"], "interval": None, "n": len(docs)}, "limit": 4,
            "seed": 0, "lm_eval_version": "x"}


def test_comparison_needs_the_same_documents():
    dense, pruned = _result([1, 5, 7, 9], [1, 1, 0, 1]), _result([1, 5, 7, 9], [0, 1, 0, 1])
    c = compare_zero_shot(dense, pruned)
    assert c["tasks"]["piqa"]["difference"]["value"] == pytest.approx(-0.25)
    assert c["mean"]["difference"]["value"] == pytest.approx(-0.25)
    with pytest.raises(StructPruneError, match="different documents"):
        compare_zero_shot(dense, _result([1, 5, 7, 8], [0, 1, 0, 1]))


# -- lm-eval ------------------------------------------------------------------------------------

def _requests(task_obj):
    task_obj.build_all_requests(rank=0, world_size=1)
    return [(i.doc_id, i.idx, tuple(i.arguments)) for i in task_obj.instances]


@pytest.fixture(scope="module")
def task_managers(tmp_path_factory):
    """One folder of local tasks (40 seeded documents of each shipped task) and two lm-eval task
    managers, built once (indexing lm-eval's task YAMLs takes seconds): with that folder and without."""
    _lm_eval()
    from lm_eval.tasks import TaskManager

    from structprune.eval.zeroshot import write_local_tasks

    folder = tmp_path_factory.mktemp("local-tasks")
    data = {t: load_task_data(t, folder) for t in SHIPPED_TASKS}  # an empty folder: the packaged copies
    docs = {t: select_documents(len(td.rows), 40, 0, t) for t, td in data.items()}
    write_local_tasks(folder, data, docs)
    return TaskManager(include_path=str(folder)), TaskManager(), data, docs


@pytest.mark.lm_eval
@pytest.mark.parametrize("task", SHIPPED_TASKS)
def test_local_task_makes_the_builtin_requests(task, task_managers, monkeypatch):
    """The YAML that includes lm-eval's definition and reads the local file produces exactly the
    requests (contexts and continuations) of lm-eval's built-in task given the same documents (the
    built-in one's hub download replaced by those documents)."""
    import datasets
    from lm_eval.tasks import get_task_dict

    from structprune.eval.zeroshot import builtin_yaml

    local_manager, builtin_manager, data, docs = task_managers
    td, docs = data[task], docs[task]
    local = _requests(get_task_dict([task], local_manager)[task])

    builtin_text = builtin_yaml(task).read_text()
    if "include:" in builtin_text:  # arc_challenge includes arc_easy.yaml
        builtin_text = (builtin_yaml(task).parent / builtin_text.split("include:")[1].split()[0]).read_text() \
            + builtin_text
    hub_path = [ln.split(":", 1)[1].strip() for ln in builtin_text.splitlines() if ln.startswith("dataset_path:")][0]
    calls = []

    def fake_load_dataset(path=None, name=None, **kwargs):
        calls.append(path)
        assert path == hub_path, f"the built-in task reads {path}, not {hub_path}"
        rows = [json.loads(td.rows[i]) for i in docs]
        return datasets.DatasetDict({td.split: datasets.Dataset.from_list(rows),
                                     "train": datasets.Dataset.from_list(rows[:1])})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    builtin = _requests(get_task_dict([task], builtin_manager)[task])
    assert calls == [hub_path]
    assert len(local) == len(builtin) >= 2 * len(docs)
    assert local == builtin
    contexts = {args[0] for _, _, args in local}
    if task == "boolq":
        assert all(c.endswith("?\nAnswer:") for c in contexts)
        assert {args[1] for _, _, args in local} == {" no", " yes"}
    if task.startswith("arc"):
        assert all(c.startswith("Question: ") and c.endswith("\nAnswer:") for c in contexts)


@pytest.mark.lm_eval
def test_hellaswag_first_document_renders_as_lm_eval(tmp_path):
    _lm_eval()
    from lm_eval.tasks import TaskManager, get_task_dict

    from structprune.eval.zeroshot import write_local_tasks

    td = load_task_data("hellaswag", tmp_path)
    write_local_tasks(tmp_path, {"hellaswag": td}, {"hellaswag": [0]})
    reqs = _requests(get_task_dict(["hellaswag"], TaskManager(include_path=str(tmp_path)))["hellaswag"])
    assert [r[2][0] for r in reqs] == ["Roof shingle removal: A man is sitting on a roof. He"] * 4
    assert reqs[3][2][1] == " starts pulling up roofing on a roof."


@pytest.fixture
def tiny_lm(make_tiny_llama, byte_tokenizer):
    return make_tiny_llama(max_position_embeddings=4096), byte_tokenizer


@pytest.mark.lm_eval
def test_zero_shot_smoke_on_real_data(tiny_lm, tmp_path):
    """Every shipped task, three seeded documents each, through lm-eval on a tiny random model."""
    _lm_eval()
    from structprune.eval.zeroshot import format_zero_shot, zero_shot

    model, tok = tiny_lm
    forwards = []
    model.register_forward_hook(lambda *_: forwards.append(1))  # lm-eval runs in-process on this very object
    res = zero_shot(model, tok, SHIPPED_TASKS, limit=3, seed=0, batch_size=4, data_dir=tmp_path, quiet=True)
    assert forwards
    assert list(res["tasks"]) == list(SHIPPED_TASKS)
    for task, r in res["tasks"].items():
        assert r["n"] == 3 and r["documents"] == select_documents(ROWS[task], 3, 0, task)
        assert r["data"]["source"] == "packaged" and r["data"]["sha256"] == BUNDLED_TASKS[task]
        scores = r["correct"][r["primary"]]
        assert set(scores) <= {0, 1} and r["value"] == pytest.approx(sum(scores) / 3)
        assert r["stderr"] is not None and r["interval"][0] <= r["value"] <= r["interval"][1]
    assert res["mean"]["n"] == 18 and res["mean"]["tasks"] == 6
    assert res["mean"]["value"] == pytest.approx(sum(r["value"] for r in res["tasks"].values()) / 6)
    lines = format_zero_shot(res)
    assert lines[-1].startswith("(lm-eval ") and "seeded random sample of 3" in lines[-1]


@pytest.mark.lm_eval
def test_openbookqa_from_a_user_file_and_without_one(tiny_lm, tmp_path, monkeypatch):
    lm_eval = _lm_eval()
    from structprune.eval.zeroshot import zero_shot

    model, tok = tiny_lm
    rows = [{"id": f"q{i}", "question_stem": f"Which is number {i}?", "answerKey": "B",
             "choices": {"text": ["one", "two", "three", "four"], "label": ["A", "B", "C", "D"]}} for i in range(4)]
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "openbookqa_test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = zero_shot(model, tok, ["openbookqa"], limit=None, data_dir=folder, batch_size=4, quiet=True)
    r = res["tasks"]["openbookqa"]
    assert r["n"] == 4 and r["data"]["source"] == "folder" and r["primary"] == "acc_norm"

    def unreachable(*a, **k):  # what a hub download looks like offline, wrapped as datasets does
        raise RuntimeError("dataset load failed") from ConnectionError("hub unreachable")

    monkeypatch.setattr(lm_eval, "simple_evaluate", unreachable)
    monkeypatch.setenv(task_data.ZEROSHOT_DATA_ENV, str(tmp_path))  # no openbookqa file there: the hub
    with pytest.raises(StructPruneError, match="OpenBookQA does not ship") as e:
        zero_shot(model, tok, ["openbookqa"], batch_size=4, quiet=True)
    assert "\n" not in str(e.value)
    with pytest.raises(StructPruneError, match="task data for lambada_openai is unreachable: no local file"):
        zero_shot(model, tok, ["lambada_openai"], batch_size=4, quiet=True)


@pytest.mark.lm_eval
def test_unknown_task_is_refused():
    _lm_eval()
    from structprune.eval.zeroshot import check_tasks

    with pytest.raises(StructPruneError, match="unknown zero-shot task.*hellaswagg"):
        check_tasks(["hellaswagg"])


@pytest.fixture
def tiny_folder(tmp_path, make_tiny_llama, byte_tokenizer):
    path = tmp_path / "tiny"
    make_tiny_llama(max_position_embeddings=4096).save_pretrained(path)
    byte_tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture
def calib_file(tmp_path):
    p = tmp_path / "calib.txt"
    p.write_text(" ".join(f"The quick brown fox {i} jumps over the lazy dog." for i in range(400)))
    return str(p)


@pytest.mark.lm_eval
@pytest.mark.parametrize("in_memory", [False, True])
def test_prune_eval_with_tasks(tiny_folder, calib_file, tmp_path, capsys, in_memory, monkeypatch):
    _lm_eval()
    from structprune.cli import main

    monkeypatch.setenv(task_data.ZEROSHOT_DATA_ENV, str(tmp_path))
    out = tmp_path / "out"
    args = ["prune", tiny_folder, "--sparsity", "0.4", "--method", "wanda-sp", "--calib", calib_file,
            "--nsamples", "2", "--seqlen", "64", "--eval", f"{calib_file},winogrande,arc_easy", "--eval-limit", "1",
            "--eval-seqlen", "128", "--mlp-multiple", "1", "--zero-shot-limit", "4", "--zero-shot-batch-size", "4",
            "--output", str(out), "-q"] + (["--in-memory"] if in_memory else [])
    assert main(args) == 0
    r = json.loads((out / "report.json").read_text())
    assert list(r["ppl"]) == [calib_file]
    zs = r["zero_shot"]
    assert list(zs["tasks"]) == ["winogrande", "arc_easy"] and zs["limit"] == 4
    for task, t in zs["tasks"].items():
        assert t["n"] == 4 and t["documents"] == select_documents(ROWS[task], 4, 0, task)
        a, b = t["correct"]["pruned"], t["correct"]["dense"]
        assert t["difference"]["value"] == pytest.approx((sum(a) - sum(b)) / 4)
        assert t["difference"]["low"] <= t["difference"]["value"] <= t["difference"]["high"]
    assert zs["mean"]["n"] == 8 and zs["mean"]["difference"] is not None
    printed = capsys.readouterr()
    assert "0-shot winogrande" in printed.out and "0-shot mean" in printed.out


@pytest.mark.lm_eval
def test_prune_eval_refuses_an_unknown_task_first(tiny_folder, calib_file, tmp_path, capsys):
    _lm_eval()
    from structprune.cli import main

    out = tmp_path / "out"
    args = ["prune", tiny_folder, "--sparsity", "0.4", "--method", "wanda-sp", "--calib", calib_file,
            "--nsamples", "2", "--seqlen", "64", "--eval", "wikitext2,piqa,hellaswagg", "--output", str(out), "-q"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown zero-shot task(s): hellaswagg" in err and err.startswith("structprune:")
    assert not out.exists()


@pytest.mark.lm_eval
def test_eval_refuses_an_altered_packaged_file(tiny_folder, tmp_path, capsys, monkeypatch):
    _lm_eval()
    from structprune.cli import main

    bundled = tmp_path / "bundled"
    bundled.mkdir()
    shutil.copy(task_data.bundled_task_path("piqa"), bundled)
    p = bundled / task_data.bundled_task_path("piqa").name
    p.write_bytes(gzip.compress(gzip.decompress(p.read_bytes()).replace(b'"label": 0', b'"label": 1', 1)))
    monkeypatch.setattr(task_data, "BUNDLED_DIR", bundled)
    monkeypatch.setenv(task_data.ZEROSHOT_DATA_ENV, str(tmp_path))
    assert main(["eval", tiny_folder, "--zero-shot", "piqa", "-q"]) == 2
    errors = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("structprune: error:")]
    assert len(errors) == 1 and "fails its SHA-256 check" in errors[0] and p.name in errors[0]


@pytest.mark.lm_eval
def test_eval_zero_shot_alone(tiny_folder, tmp_path, capsys):
    """``structprune eval MODEL --zero-shot TASKS`` (no perplexity set) prints and saves the accuracies."""
    _lm_eval()
    from structprune.cli import main

    out = tmp_path / "zs.json"
    assert main(["eval", tiny_folder, "--zero-shot", "winogrande", "--zero-shot-limit", "3", "--zero-shot-data",
                 str(tmp_path), "--json", str(out), "-q"]) == 0
    printed = capsys.readouterr()
    assert "winogrande      acc" in printed.out and "seeded random sample of 3" in printed.out
    r = json.loads(out.read_text())
    assert r["ppl"] == {} and r["zero_shot"]["tasks"]["winogrande"]["n"] == 3


def test_table_means_the_tasks_above_chance_with_a_paired_difference(load_benchmark):
    """benchmarks/zeroshot.py: the mean over the tasks where the dense model is above chance (a task at
    or below chance has no ability to lose; BoolQ's answer bias moves every pruned row by +25 points)."""
    zs = load_benchmark("zeroshot")

    def task(correct, interval):
        return {"primary": "acc", "value": sum(correct) / len(correct), "interval": interval,
                "documents": list(range(len(correct))), "correct": {"acc": correct}}

    dense = {"label": "dense", "sparsity_target": 0.0, "zero_shot": {"tasks": {
        "piqa": task([1.0] * 8 + [0.0] * 2, [0.6, 1.0]), "winogrande": task([1.0] * 5 + [0.0] * 5, [0.2, 0.8])}}}
    pruned = {"label": "structprune", "sparsity_target": 0.3, "zero_shot": {"tasks": {
        "piqa": task([1.0] * 6 + [0.0] * 4, [0.3, 0.9]), "winogrande": task([1.0] * 9 + [0.0], [0.7, 1.0])}}}
    assert zs.above_chance(dense["zero_shot"]["tasks"], ["piqa", "winogrande"]) == ["piqa"]
    other = {"label": "global", "sparsity_target": 0.3, "zero_shot": {"tasks": {
        "piqa": task([1.0] * 7 + [0.0] * 3, [0.4, 1.0]), "winogrande": task([0.0] * 10, [0.0, 0.1])}}}
    lines = zs.informative_mean([dense, pruned, other], ["piqa", "winogrande"])
    assert lines[1] == "## Mean over the tasks above chance (PIQA)"
    assert lines[-3] == "| dense | 0% | 80.0 |  |  |"
    assert lines[-2].startswith("| structprune | 30% | 60.0 | -20.0 [") and lines[-2].endswith("|  |")  # WinoGrande's +40 left out
    assert lines[-1].startswith("| global | 30% | 70.0 | -10.0 [") and lines[-1].count("| -10.0 [") == 2  # also StructPrune - global
