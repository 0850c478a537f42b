"""Tests for finding a model offline in the local Hugging Face cache (model ids, revisions, symlinked
blobs) and for sharded checkpoints (model.safetensors.index.json / pytorch_model.bin.index.json),
with transformers and huggingface_hub as test-only oracles for the file layouts."""

from __future__ import annotations

import ast
import hashlib
import json
import os
import socket
from pathlib import Path

import pytest
import torch
from helpers import hf_gpt2
from huggingface_hub import scan_cache_dir, snapshot_download  # test-only oracle for the cache layout
from transformers import GPT2LMHeadModel  # test-only oracle for sharded files

import lmforge.hub
from lmforge.config import GPTConfig
from lmforge.hub import (
    LEGACY_WEIGHTS_INDEX_NAME,
    WEIGHTS_INDEX_NAME,
    hf_cache_dir,
    is_repo_id,
    parse_size,
    read_weights,
    resolve_model_dir,
    save_pretrained,
)
from lmforge.models.gpt import GPTForCausalLM

pytestmark = pytest.mark.usefixtures("one_thread")

V = 97
IDS = torch.tensor([[1, 5, 9, 33, 2, 96, 0, 7]])
COMMIT_A = "a" * 40
COMMIT_B = "0123456789abcdef0123456789abcdef01234567"


def tiny_model(seed: int = 0) -> GPTForCausalLM:
    torch.manual_seed(seed)
    m = GPTForCausalLM(GPTConfig(vocab_size=V, n_positions=16, n_layer=2, n_head=2, n_embd=16)).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


def hf_model(seed: int = 0) -> GPT2LMHeadModel:
    return hf_gpt2(V, seed)


def cache_model(cache: Path, repo_id: str, source: Path, commit: str, ref: str | None = "main") -> Path:
    """Put `source`'s files into `cache` as huggingface_hub lays them out: content in blobs/, the
    snapshot's files relative symlinks into it, refs/<ref> holding the commit hash."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for f in sorted(source.iterdir()):
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    if ref is not None:
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snapshot


def saved(tmp_path: Path, seed: int = 0) -> tuple[GPTForCausalLM, Path]:
    m = tiny_model(seed)
    d = tmp_path / f"saved-{seed}"
    m.save_pretrained(d)
    return m, d


def hf_logits(hf: GPT2LMHeadModel) -> torch.Tensor:
    with torch.no_grad():
        return hf(IDS).logits


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No Hugging Face variables from the machine, HOME in tmp_path, and any network use fails."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)

    def no_network(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    return tmp_path


@pytest.fixture()
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    return root


# ---------------------------------------------------------------------------------- model ids in the cache
def test_model_id_loads_from_the_cache_through_symlinks(tmp_path, cache):
    m, d = saved(tmp_path)
    snapshot = cache_model(cache, "org/tiny", d, COMMIT_A)
    assert (snapshot / "model.safetensors").is_symlink()
    # huggingface_hub itself reads this layout as a cached repo at that commit
    info = scan_cache_dir(cache)
    assert [(r.repo_id, [rev.commit_hash for rev in r.revisions]) for r in info.repos] == [("org/tiny", [COMMIT_A])]
    assert Path(snapshot_download("org/tiny", cache_dir=cache, local_files_only=True)) == snapshot

    assert resolve_model_dir("org/tiny") == snapshot
    loaded = GPTForCausalLM.from_pretrained("org/tiny")
    torch.testing.assert_close(
        loaded(IDS).logits, m(IDS).logits, rtol=1e-5, atol=1e-6
    )  # decode_layout: same weights, rounding may differ
    assert read_weights(snapshot)[1] == snapshot / "model.safetensors"


def test_cache_root_follows_hf_home_then_home(tmp_path, monkeypatch):
    m, d = saved(tmp_path)
    hf_home = tmp_path / "hf-home"
    snapshot = cache_model(hf_home / "hub", "tiny", d, COMMIT_A)  # an id without an org: models--tiny
    monkeypatch.setenv("HF_HOME", str(hf_home))
    assert hf_cache_dir() == hf_home / "hub"
    assert resolve_model_dir("tiny") == snapshot
    torch.testing.assert_close(
        GPTForCausalLM.from_pretrained("tiny")(IDS).logits, m(IDS).logits, rtol=1e-5, atol=1e-6
    )  # decode_layout: same weights, rounding may differ

    monkeypatch.delenv("HF_HOME")
    default = tmp_path / "home" / ".cache" / "huggingface" / "hub"
    assert hf_cache_dir() == default
    with pytest.raises(FileNotFoundError, match="not in the Hugging Face cache"):
        resolve_model_dir("tiny")
    snapshot = cache_model(default, "org/tiny", d, COMMIT_B)
    assert resolve_model_dir("org/tiny") == snapshot

    # HF_HUB_CACHE wins over HF_HOME
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_CACHE", str(default))
    assert resolve_model_dir("org/tiny") == snapshot
    # cache_dir= wins over the environment
    in_hf_home = hf_home / "hub" / "models--tiny" / "snapshots" / COMMIT_A
    assert resolve_model_dir("tiny", cache_dir=hf_home / "hub") == in_hf_home


def test_existing_local_path_wins_over_a_cache_id(tmp_path, cache):
    _, d = saved(tmp_path, seed=0)
    cache_model(cache, "org/tiny", d, COMMIT_A)
    local_model = tiny_model(seed=1)
    local_model.save_pretrained(tmp_path / "org" / "tiny")  # cwd is tmp_path: "org/tiny" is also a path
    assert resolve_model_dir("org/tiny") == Path("org/tiny")
    torch.testing.assert_close(
        GPTForCausalLM.from_pretrained("org/tiny")(IDS).logits, local_model(IDS).logits, rtol=1e-5, atol=1e-6
    )  # decode_layout: same weights, rounding may differ
    with pytest.raises(ValueError, match="revision='main' applies to Hugging Face cache ids, but org/tiny is a"):
        resolve_model_dir("org/tiny", revision="main")


def test_revision_selection(tmp_path, cache):
    m_old, d_old = saved(tmp_path, seed=0)
    m_new, d_new = saved(tmp_path, seed=1)
    old = cache_model(cache, "org/tiny", d_old, COMMIT_A, ref="v1")
    new = cache_model(cache, "org/tiny", d_new, COMMIT_B, ref="main")
    cache_model(cache, "org/tiny", d_old, "c" * 40, ref="pr/3")  # refs can be nested, as for PRs
    for revision, expected in [(None, new), ("main", new), ("v1", old), (COMMIT_A, old), (COMMIT_B, new)]:
        assert resolve_model_dir("org/tiny", revision=revision) == expected, revision
        oracle = snapshot_download("org/tiny", cache_dir=cache, local_files_only=True, revision=revision)
        assert Path(oracle) == expected, revision
    assert resolve_model_dir("org/tiny", revision="pr/3").name == "c" * 40
    torch.testing.assert_close(
        GPTForCausalLM.from_pretrained("org/tiny")(IDS).logits, m_new(IDS).logits, rtol=1e-5, atol=1e-6
    )  # decode_layout: same weights, rounding may differ
    torch.testing.assert_close(
        GPTForCausalLM.from_pretrained("org/tiny", revision="v1")(IDS).logits, m_old(IDS).logits, rtol=1e-5, atol=1e-6
    )  # decode_layout: same weights, rounding may differ
    with pytest.raises(
        FileNotFoundError,
        match=r"revision 'v2' of 'org/tiny' is not in the Hugging Face cache .*"
        r"refs/: \['main', 'pr/3', 'v1'\].*download",
    ):
        resolve_model_dir("org/tiny", revision="v2")
    with pytest.raises(ValueError, match="not a branch, tag or commit name"):
        resolve_model_dir("org/tiny", revision="../../elsewhere")


def test_snapshot_choice_without_refs_main(tmp_path, cache):
    m, d = saved(tmp_path)
    only = cache_model(cache, "org/tiny", d, COMMIT_A, ref=None)
    assert resolve_model_dir("org/tiny") == only  # the only snapshot
    cache_model(cache, "org/tiny", d, COMMIT_B, ref=None)
    with pytest.raises(
        FileNotFoundError,
        match=rf"several snapshots \['{COMMIT_B}', '{COMMIT_A}'\] and no "
        r"refs/main.*pass revision=",
    ):
        resolve_model_dir("org/tiny")
    assert resolve_model_dir("org/tiny", revision=COMMIT_A) == only


# ---------------------------------------------------------------------------------- errors
def test_missing_model_id_says_where_it_looked_and_how_to_get_it(cache):
    with pytest.raises(FileNotFoundError) as e:
        GPTForCausalLM.from_pretrained("org/missing")
    message = str(e.value)
    assert "not a local directory" in message
    assert str(cache / "models--org--missing") in message
    assert "download" in message and "huggingface-cli download org/missing" in message
    # a path that cannot be a model id keeps the plain local-directory error
    with pytest.raises(FileNotFoundError, match=r"model directory .*nope does not exist"):
        resolve_model_dir("./nope")


def test_empty_or_incomplete_cache_entries(tmp_path, cache):
    _, d = saved(tmp_path)
    (cache / "models--org--empty" / "snapshots").mkdir(parents=True)
    with pytest.raises(
        FileNotFoundError,
        match=r"models--org--empty is in the Hugging Face cache but holds no "
        r"snapshot .*interrupted.*download",
    ):
        resolve_model_dir("org/empty")
    (cache / "models--org--blobsonly" / "blobs").mkdir(parents=True)  # no snapshots folder at all
    with pytest.raises(FileNotFoundError, match="holds no snapshot"):
        resolve_model_dir("org/blobsonly")

    snapshot = cache_model(cache, "org/tiny", d, COMMIT_A)
    (cache / "models--org--tiny" / "refs" / "main").write_text(COMMIT_B)
    with pytest.raises(FileNotFoundError, match=rf"refs.main points at commit '{COMMIT_B}', but .* does not exist"):
        resolve_model_dir("org/tiny")
    (cache / "models--org--tiny" / "refs" / "main").write_text(COMMIT_A + "\n")  # a trailing newline is fine
    assert resolve_model_dir("org/tiny") == snapshot

    (snapshot / "model.safetensors").resolve().unlink()  # a blob deleted under the link
    with pytest.raises(
        FileNotFoundError,
        match=r"model.safetensors is a link to .*blobs.*which does not exist: "
        r"the Hugging Face cache is incomplete",
    ):
        GPTForCausalLM.from_pretrained("org/tiny")
    (snapshot / "config.json").unlink()  # a partial download: the weights but no config
    with pytest.raises(FileNotFoundError, match=rf"{COMMIT_A} has no config.json"):
        resolve_model_dir("org/tiny")


def test_model_id_shapes_and_no_hub_import():
    assert is_repo_id("gpt2") and is_repo_id("openai-community/gpt2") and is_repo_id("Qwen/Qwen2.5-0.5B")
    for not_id in ("a/b/c", "./x", "/abs/x", "~/m", "a--b", "x/.y", "x.", "", "x//y"):
        assert not is_repo_id(not_id), not_id
    # library code never imports huggingface_hub (which could reach the network)
    nodes = [
        n
        for f in Path(lmforge.hub.__file__).parent.glob("*.py")
        for n in ast.walk(ast.parse(f.read_text(encoding="utf-8")))
    ]
    imported = {a.name for n in nodes if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module or "" for n in nodes if isinstance(n, ast.ImportFrom)}
    assert not any(name.startswith("huggingface_hub") for name in imported)


# ---------------------------------------------------------------------------------- sharded checkpoints
def test_transformers_sharded_safetensors_load_from_the_cache(tmp_path, cache):
    hf = hf_model(seed=2)
    d = tmp_path / "hf-sharded"
    hf.save_pretrained(d, max_shard_size="20KB")
    shards = sorted(p.name for p in d.glob("model-*.safetensors"))
    assert len(shards) >= 2 and (d / WEIGHTS_INDEX_NAME).is_file() and not (d / "model.safetensors").exists()
    expected = hf_logits(hf)

    state, source = read_weights(d)
    assert source == d / WEIGHTS_INDEX_NAME
    weight_map = json.loads(source.read_text())["weight_map"]
    assert set(weight_map) <= set(state) and sorted(set(weight_map.values())) == shards
    assert (GPTForCausalLM.from_pretrained(d)(IDS).logits - expected).abs().max().item() <= 1e-5

    cache_model(cache, "org/sharded", d, COMMIT_A)  # shards as symlinks into blobs/
    assert (GPTForCausalLM.from_pretrained("org/sharded")(IDS).logits - expected).abs().max().item() <= 1e-5


def test_sharded_checkpoint_errors(tmp_path):
    hf = hf_model(seed=2)
    d = tmp_path / "hf-sharded"
    hf.save_pretrained(d, max_shard_size="20KB")
    shards = sorted(d.glob("model-*.safetensors"))
    index = d / WEIGHTS_INDEX_NAME
    original = index.read_text()

    data = shards[-1].read_bytes()
    shards[-1].write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=rf"{shards[-1].name} is truncated or not a safetensors file"):
        GPTForCausalLM.from_pretrained(d)
    shards[-1].unlink()
    with pytest.raises(
        FileNotFoundError,
        match=rf"{WEIGHTS_INDEX_NAME} lists shard\(s\) \['{shards[-1].name}'\] "
        r"that are not in .*incomplete",
    ):
        GPTForCausalLM.from_pretrained(d)
    shards[-1].write_bytes(data)

    index.write_text(original.replace('"weight_map"', '"weights"'))
    with pytest.raises(ValueError, match="has no usable weight_map"):
        read_weights(d)
    index.write_text(original[:40])
    with pytest.raises(ValueError, match=rf"{WEIGHTS_INDEX_NAME} is not valid JSON"):
        read_weights(d)
    bad = json.loads(original)
    bad["weight_map"]["transformer.wte.weight"] = "../elsewhere.safetensors"
    index.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="names shard files outside its folder"):
        read_weights(d)
    bad = json.loads(original)
    bad["weight_map"]["transformer.extra.weight"] = shards[0].name
    index.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"maps \['transformer.extra.weight'\] to shards that do not contain them"):
        read_weights(d)


def test_single_file_preferred_over_an_index(tmp_path):
    m, d = saved(tmp_path)
    (d / WEIGHTS_INDEX_NAME).write_text(json.dumps({"weight_map": {"x": "model-00001-of-00002.safetensors"}}))
    state, source = read_weights(d)
    assert source.name == "model.safetensors"
    torch.testing.assert_close(
        GPTForCausalLM.from_pretrained(d)(IDS).logits, m(IDS).logits, rtol=1e-5, atol=1e-6
    )  # decode_layout: same weights, rounding may differ


def test_sharded_pytorch_model_bin(tmp_path):
    hf = hf_model(seed=3)
    hf.config.save_pretrained(tmp_path)
    state = dict(hf.state_dict())
    names = sorted(state)
    halves = {
        "pytorch_model-00001-of-00002.bin": names[: len(names) // 2],
        "pytorch_model-00002-of-00002.bin": names[len(names) // 2 :],
    }
    for shard, keys in halves.items():
        torch.save({k: state[k].clone() for k in keys}, tmp_path / shard)
    weight_map = {k: shard for shard, keys in halves.items() for k in keys}
    (tmp_path / LEGACY_WEIGHTS_INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    _, source = read_weights(tmp_path)
    assert source.name == LEGACY_WEIGHTS_INDEX_NAME
    assert (GPTForCausalLM.from_pretrained(tmp_path)(IDS).logits - hf_logits(hf)).abs().max().item() <= 1e-5
    (tmp_path / "pytorch_model-00002-of-00002.bin").unlink()
    with pytest.raises(FileNotFoundError, match=r"lists shard\(s\) \['pytorch_model-00002-of-00002.bin'\]"):
        read_weights(tmp_path)


def test_save_pretrained_shards_load_in_transformers(tmp_path):
    m = tiny_model()
    d = tmp_path / "sharded"
    save_pretrained(m, d, max_shard_size="10KB")
    shards = sorted(p.name for p in d.glob("model-*.safetensors"))
    n = len(shards)
    assert n >= 2 and shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert not (d / "model.safetensors").exists() and not list(d.glob(".*"))
    index = json.loads((d / WEIGHTS_INDEX_NAME).read_text())
    sizes = {k: v.numel() * v.element_size() for k, v in read_weights(d)[0].items()}
    assert index["metadata"]["total_size"] == sum(sizes.values())
    for shard in shards:  # each shard within the limit (no single tensor here is larger)
        assert sum(sizes[k] for k, s in index["weight_map"].items() if s == shard) <= 10_000

    hf = GPT2LMHeadModel.from_pretrained(d).eval()
    assert (hf_logits(hf) - m(IDS).logits).abs().max().item() <= 1e-5
    torch.testing.assert_close(
        GPTForCausalLM.from_pretrained(d)(IDS).logits, m(IDS).logits, rtol=1e-5, atol=1e-6
    )  # decode_layout: same weights, rounding may differ

    # re-saving into the same folder leaves no stale weights behind, in either direction
    save_pretrained(m, d)
    assert sorted(p.name for p in d.iterdir()) == ["config.json", "model.safetensors"]
    save_pretrained(m, d, max_shard_size=10_000)
    assert sorted(p.name for p in d.iterdir()) == sorted(["config.json", WEIGHTS_INDEX_NAME, *shards])
    save_pretrained(m, d, max_shard_size="1GB")  # fits in one file: written unsharded, as transformers does
    assert sorted(p.name for p in d.iterdir()) == ["config.json", "model.safetensors"]


def test_parse_size():
    assert parse_size(123) == 123 and parse_size("10KB") == 10_000 and parse_size("500MB") == 500 * 10**6
    assert parse_size("1GiB") == 2**30 and parse_size("2kib") == 2048 and parse_size("8Mb") == 10**6
    for bad in ("10", "ten MB", "0KB", 0, -5, "1TB", True):
        with pytest.raises(ValueError, match="is not a size"):
            parse_size(bad)


def test_saved_dtype_is_restored_on_load(tmp_path):
    import torch

    from lmforge import GPTConfig, GPTForCausalLM

    model = GPTForCausalLM(GPTConfig(vocab_size=50, n_positions=16, n_layer=1, n_head=2, n_embd=16))
    model.to(torch.bfloat16).save_pretrained(tmp_path)
    assert GPTForCausalLM.from_pretrained(tmp_path).dtype == torch.bfloat16
    assert GPTForCausalLM.from_pretrained(tmp_path, dtype="float32").dtype == torch.float32
    with pytest.raises(ValueError, match="not a floating-point torch dtype"):
        GPTForCausalLM.from_pretrained(tmp_path, dtype="int8")


def test_tokenizer_from_a_cached_model_id(tmp_path, monkeypatch):
    from lmforge import AutoTokenizer, Tokenizer

    tok = Tokenizer.train_bpe(iterator=["床前明月光 hello world"] * 20, vocab_size=280)
    snapshot = tmp_path / "hub" / "models--org--tok" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    tok.save_pretrained(snapshot)
    (tmp_path / "hub" / "models--org--tok" / "refs").mkdir()
    (tmp_path / "hub" / "models--org--tok" / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    loaded = Tokenizer.from_pretrained("org/tok")
    assert loaded.encode("床前明月光") == tok.encode("床前明月光")
    with pytest.raises(FileNotFoundError, match="download"):
        Tokenizer.from_pretrained("org/missing")
    assert AutoTokenizer.from_pretrained("org/tok").encode("hello") == tok.encode("hello")
