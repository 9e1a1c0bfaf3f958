"""launch/*.sh against stub gcloud/gsutil: --dry-run output, the real calls, the worker-side lines.

No cloud is reached: each test puts a stub `gcloud` and `gsutil` first on PATH. The stubs
append their argv (one JSON list a line) to a log, answer `describe` with a state, and
`storage cp` / `scp` by writing the destination file. The worker-side shell lines that run.sh,
sweep.sh and stop.sh send over ssh are also run here, in a fake $HOME with a fake venv Python.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import stat
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
SCRIPTS = ["create.sh", "setup.sh", "run.sh", "logs.sh", "fetch.sh", "delete.sh", "stop.sh", "sweep.sh"]
SETTINGS = ["--name=tpu-a", "--zone=us-central2-b", "--project=proj-x"]
CONFIG = "configs/bert_sst2.py:demo"

STUB = r'''#!{python}
"""Stub of gcloud/gsutil for tests: records argv, fakes describe, cp and scp."""
import json, os, shutil, sys
from pathlib import Path

log = Path(os.environ["STUB_LOG"])
args = sys.argv[1:]
with log.open("a") as f:
    f.write(json.dumps([Path(sys.argv[0]).name] + args) + "\n")

def fake_copy(src, dst):
    missing = os.environ.get("STUB_MISSING", "")
    if missing and missing in src:
        print(f"ERROR: {{src}} not found", file=sys.stderr)
        sys.exit(1)
    if os.path.exists(src):  # a local file going up: keep a copy to inspect
        shutil.copy(src, log.parent / ("uploaded_" + os.path.basename(dst.split(":")[-1])))
    else:
        Path(dst).write_text(json.dumps({{"from": src}}))

if "describe" in args:
    states = os.environ.get("STUB_STATES", "ACTIVE" if "queued-resources" in args else "READY").split(",")
    counter = log.parent / "describe_count"
    n = int(counter.read_text()) if counter.exists() else 0
    counter.write_text(str(n + 1))
    print(states[min(n, len(states) - 1)])
elif args[:2] == ["storage", "cp"] or args[:2] == ["-q", "cp"]:
    fake_copy(args[2], args[3])
elif "scp" in args:
    i = args.index("scp")
    fake_copy(args[i + 1], args[i + 2])
'''


@pytest.fixture
def env(tmp_path):
    """An environment with the stubs first on PATH, no FTJAX_* settings and a scratch HOME."""
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    for name in ("gcloud", "gsutil"):
        path = stubs / name
        path.write_text(STUB.format(python=sys.executable))
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    e = {k: v for k, v in os.environ.items() if not k.startswith(("FTJAX_", "STUB_"))}
    e.update(PATH=f"{stubs}{os.pathsep}{e['PATH']}", HOME=str(tmp_path / "home"), STUB_LOG=str(stubs / "calls.jsonl"))
    (tmp_path / "home").mkdir()
    return e


def launch(script, *args, env, cwd=REPO, stdin=subprocess.DEVNULL):
    return subprocess.run(["bash", str(LAUNCH / script), *args], env=env, cwd=cwd, stdin=stdin,
                          capture_output=True, text=True, timeout=60)


def calls(env):
    log = Path(env["STUB_LOG"])
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def dry_commands(out):
    """The `+ ` lines of a --dry-run, each split back into its words."""
    return [shlex.split(line[2:]) for line in out.splitlines() if line.startswith("+ ")]


def remote_command(words):
    """The worker-side shell line of a `gcloud compute tpus tpu-vm ssh ... --command=X`."""
    (command,) = [w for w in words if w.startswith("--command=")]
    return command[len("--command="):]


def ftjax_words(remote):
    """The words of the `python -m ftjax.main ...` commands inside a worker-side line."""
    words = shlex.split(remote)
    runs, i = [], 0
    while i < len(words):
        if words[i] == "-m" and words[i + 1] == "ftjax.main":
            j = i + 2
            while j < len(words) and words[j].startswith("--"):
                j += 1
            runs.append(words[i + 2:j])
            i = j
        else:
            i += 1
    return runs


# --- every script -----------------------------------------------------------------------------

@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script, env):
    r = launch(script, "--help", env=env)
    assert r.returncode == 0, r.stderr
    assert "Usage: launch/" + script in r.stdout
    assert "--dry-run" in r.stdout
    assert calls(env) == []


@pytest.mark.parametrize("script,args", [
    ("create.sh", ["--zone=z", "--project=p", "--accelerator-type=v4-8"]),
    ("setup.sh", []),
    ("run.sh", ["--config=" + CONFIG, "--workdir=gs://b/r", "--accelerator-type=v4-8"]),
    ("logs.sh", []),
    ("fetch.sh", ["/on/the/vm"]),
    ("delete.sh", ["--yes"]),
    ("stop.sh", []),
    ("sweep.sh", ["--config=" + CONFIG, "--workdir-root=gs://b/s", "--grid=method=lora,full"]),
])
def test_missing_setting_is_one_line_and_exit_2(script, args, env):
    r = launch(script, *args, env=env)
    assert r.returncode == 2
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"{script}: error: missing setting: ")
    assert "--name (or FTJAX_TPU_NAME)" in lines[0]
    assert calls(env) == []


def test_settings_come_from_the_environment(env):
    env.update(FTJAX_TPU_NAME="tpu-e", FTJAX_ZONE="europe-west4-a", FTJAX_PROJECT="proj-e",
               FTJAX_ACCELERATOR_TYPE="v5litepod-8", FTJAX_RUNTIME_VERSION="v2-alpha-tpuv5-lite")
    r = launch("create.sh", "--dry-run", env=env)
    assert r.returncode == 0, r.stderr
    (cmd,) = dry_commands(r.stdout)
    assert cmd == ["gcloud", "compute", "tpus", "tpu-vm", "create", "tpu-e", "--zone=europe-west4-a",
                   "--project=proj-e", "--accelerator-type=v5litepod-8", "--version=v2-alpha-tpuv5-lite"]


@pytest.mark.parametrize("script", ["run.sh", "create.sh", "delete.sh"])
def test_unknown_flag(script, env):
    r = launch(script, *SETTINGS, "--bogus", env=env)
    assert r.returncode == 2
    assert r.stderr.splitlines() == [f"{script}: error: unknown argument: --bogus (see {script} --help)"]


# --- create -----------------------------------------------------------------------------------

CREATE = [*SETTINGS, "--accelerator-type=v4-8", "--runtime-version=tpu-ubuntu2204-base"]


def test_create_dry_run(env):
    r = launch("create.sh", *CREATE, "--spot", "--dry-run", env=env)
    assert r.returncode == 0, r.stderr
    assert dry_commands(r.stdout) == [[
        "gcloud", "compute", "tpus", "tpu-vm", "create", "tpu-a", "--zone=us-central2-b", "--project=proj-x",
        "--accelerator-type=v4-8", "--version=tpu-ubuntu2204-base", "--spot"]]
    assert "until READY" in r.stdout
    assert calls(env) == []


def test_create_queued_spot_dry_run(env):
    r = launch("create.sh", *CREATE, "--queued", "--queued-id=qr-1", "--spot", "-n", env=env)
    assert r.returncode == 0, r.stderr
    assert dry_commands(r.stdout) == [[
        "gcloud", "compute", "tpus", "queued-resources", "create", "qr-1", "--node-id=tpu-a",
        "--zone=us-central2-b", "--project=proj-x", "--accelerator-type=v4-8",
        "--runtime-version=tpu-ubuntu2204-base", "--spot"]]
    assert "until ACTIVE" in r.stdout


def test_create_waits_until_ready(env):
    env["STUB_STATES"] = "CREATING,READY"
    r = launch("create.sh", *CREATE, "--poll=1", env=env)
    assert r.returncode == 0, r.stderr
    made = calls(env)
    assert made[0] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "tpu-a", "--zone=us-central2-b",
                       "--project=proj-x", "--accelerator-type=v4-8", "--version=tpu-ubuntu2204-base"]
    describe = ["gcloud", "compute", "tpus", "tpu-vm", "describe", "tpu-a", "--zone=us-central2-b",
                "--project=proj-x", "--format=value(state)"]
    assert made[1:] == [describe, describe]
    assert "tpu-a is READY" in r.stderr


def test_create_queued_waits_until_active(env):
    r = launch("create.sh", *CREATE, "--queued", "--spot", env=env)
    assert r.returncode == 0, r.stderr
    made = calls(env)
    assert made[0][:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "tpu-a"]
    assert "--spot" in made[0] and "--node-id=tpu-a" in made[0]
    assert made[1] == ["gcloud", "compute", "tpus", "queued-resources", "describe", "tpu-a",
                       "--zone=us-central2-b", "--project=proj-x", "--format=value(state.state)"]


def test_create_queued_failed_exits_1(env):
    env["STUB_STATES"] = "WAITING_FOR_RESOURCES,FAILED"
    r = launch("create.sh", *CREATE, "--queued", "--poll=1", env=env)
    assert r.returncode == 1
    assert r.stderr.splitlines()[-1].startswith("create.sh: error: tpu-a is FAILED")


def test_create_rejects_preemptible_queued(env):
    r = launch("create.sh", *CREATE, "--queued", "--preemptible", env=env)
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1


# --- setup ------------------------------------------------------------------------------------

def test_setup_dry_run(env):
    r = launch("setup.sh", *SETTINGS, "--dry-run", env=env)
    assert r.returncode == 0, r.stderr
    archive, scp, ssh = dry_commands(r.stdout)
    assert archive[:4] == ["git", "-C", str(REPO), "archive"] and archive[-1] == "HEAD"
    assert scp[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "scp", archive[5].split("=", 1)[1]]
    assert "tpu-a:ftjax-src.tar.gz" in scp and "--worker=all" in scp
    assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "tpu-a"] and "--worker=all" in ssh
    remote = remote_command(ssh)
    assert 'tar -xzf "$HOME/ftjax-src.tar.gz" -C "$HOME/ftjax"' in remote
    assert 'pip install --python "$HOME/ftjax-venv/bin/python" -e "$HOME/ftjax" \'jax[tpu]\'' in remote
    assert "venv --python 3.11" in remote
    assert calls(env) == []


def test_setup_copies_a_git_archive(env):
    r = launch("setup.sh", *SETTINGS, env=env)
    assert r.returncode == 0, r.stderr
    scp, ssh = calls(env)
    assert scp[1:5] == ["compute", "tpus", "tpu-vm", "scp"] and "--worker=all" in scp
    assert ssh[1:6] == ["compute", "tpus", "tpu-vm", "ssh", "tpu-a"] and "--worker=all" in ssh
    uploaded = Path(env["STUB_LOG"]).parent / "uploaded_ftjax-src.tar.gz"
    with tarfile.open(uploaded) as tar:
        names = set(tar.getnames())
    assert {"setup.py", "ftjax/main.py", "configs/bert_sst2.py"} <= names


def test_setup_from_git_url(env):
    r = launch("setup.sh", *SETTINGS, "--git-url=https://example.com/ftjax.git", "--ref=v0.1", "-n", env=env)
    assert r.returncode == 0, r.stderr
    (ssh,) = dry_commands(r.stdout)
    remote = remote_command(ssh)
    assert 'git clone --quiet https://example.com/ftjax.git "$HOME/ftjax"' in remote
    assert 'checkout --quiet v0.1' in remote and "jax[tpu]" in remote


def test_setup_bad_ref(env):
    r = launch("setup.sh", *SETTINGS, "--ref=no-such-ref-xyz", env=env)
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1 and "no-such-ref-xyz" in r.stderr


# --- run --------------------------------------------------------------------------------------

def test_run_dry_run_multi_worker(env):
    r = launch("run.sh", *SETTINGS, "--accelerator-type=v4-32", "--config=" + CONFIG,
               "--workdir=gs://bkt/ftjax/demo", "--config.optimizer.lr=3e-5", "--config.data.name=a b",
               "--dry-run", "--", "--config.seed=1", env=env)
    assert r.returncode == 0, r.stderr
    (ssh,) = dry_commands(r.stdout)
    assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "tpu-a"]
    assert {"--zone=us-central2-b", "--project=proj-x", "--worker=all"} <= set(ssh)
    remote = remote_command(ssh)
    assert ftjax_words(remote) == [["--config=" + CONFIG, "--workdir=gs://bkt/ftjax/demo", "--distributed",
                                    "--config.optimizer.lr=3e-5", "--config.data.name=a b", "--config.seed=1"]]
    assert 'setsid nohup "$HOME/ftjax-venv/bin/python" -m ftjax.main' in remote
    assert '> "$HOME/ftjax-logs/demo.log" 2>&1 < /dev/null &' in remote
    assert calls(env) == []


def test_run_single_worker_is_not_distributed_and_may_use_a_local_workdir(env):
    r = launch("run.sh", *SETTINGS, "--accelerator-type=v4-8", "--config=" + CONFIG,
               "--workdir=/home/me/runs/demo", "-n", env=env)
    assert r.returncode == 0, r.stderr
    (ssh,) = dry_commands(r.stdout)
    assert ftjax_words(remote_command(ssh)) == [["--config=" + CONFIG, "--workdir=/home/me/runs/demo"]]


@pytest.mark.parametrize("accelerator", ["v4-16", "v5litepod-16", "v3-32"])
def test_run_refuses_a_local_workdir_on_several_workers(accelerator, env):
    r = launch("run.sh", *SETTINGS, f"--accelerator-type={accelerator}", "--config=" + CONFIG,
               "--workdir=/tmp/demo", env=env)
    assert r.returncode == 2
    (line,) = r.stderr.splitlines()
    assert line.startswith("run.sh: error: --workdir must be gs://BUCKET/PATH on a TPU with")
    assert calls(env) == []


@pytest.mark.parametrize("args,message", [
    (["--config=configs/nope.py", "--workdir=gs://b/x"], "no config file 'configs/nope.py'"),
    (["--config=" + CONFIG, "--workdir=gs://b/x", "--config.bad"], "bad override '--config.bad'"),
    (["--config=" + CONFIG, "--workdir=gs://b/x", "--workers=0"], "--workers must be a positive integer"),
    (["--config=" + CONFIG], "missing --workdir"),
])
def test_run_user_mistakes(args, message, env):
    r = launch("run.sh", *SETTINGS, "--accelerator-type=v4-8", *args, env=env)
    assert r.returncode == 2
    (line,) = r.stderr.splitlines()
    assert message in line


def test_run_real_mode_calls_ssh_once(env):
    r = launch("run.sh", *SETTINGS, "--workers=2", "--config=" + CONFIG, "--workdir=gs://bkt/x/r1",
               "--config.method=lora", env=env)
    assert r.returncode == 0, r.stderr
    (ssh,) = calls(env)
    assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "tpu-a"] and "--worker=all" in ssh
    assert ftjax_words(remote_command(ssh)) == [
        ["--config=" + CONFIG, "--workdir=gs://bkt/x/r1", "--distributed", "--config.method=lora"]]


def fake_worker(tmp_path, python_body):
    """A fake worker $HOME: ~/ftjax and a venv whose python runs `python_body` (bash)."""
    home = tmp_path / "worker"
    (home / "ftjax").mkdir(parents=True)
    (home / "ftjax-venv" / "bin").mkdir(parents=True)
    python = home / "ftjax-venv" / "bin" / "python"
    python.write_text("#!/usr/bin/env bash\n" + python_body)
    python.chmod(0o755)
    return home


def on_worker(home, remote):
    e = dict(os.environ, HOME=str(home))
    return subprocess.run(["bash", "-c", remote], env=e, cwd=home, capture_output=True, text=True, timeout=30)


def wait_for(path, timeout=10.0):
    end = time.time() + timeout
    while time.time() < end:
        if path.exists() and path.read_text().strip():
            return path.read_text()
        time.sleep(0.05)
    raise AssertionError(f"{path} never appeared")


def test_run_worker_line_starts_the_run_detached(tmp_path, env):
    home = fake_worker(tmp_path, 'pwd > "$HOME/cwd"; printf "%s\\n" "$@" > "$HOME/args"; echo training\n')
    r = launch("run.sh", *SETTINGS, "--workers=1", "--config=" + CONFIG, "--workdir=gs://b/x/r2",
               "--config.data.name=a b", "-n", env=env)
    (ssh,) = dry_commands(r.stdout)
    w = on_worker(home, remote_command(ssh))
    assert w.returncode == 0, w.stderr
    assert "started r2" in w.stdout
    args = wait_for(home / "args").splitlines()
    assert args == ["-m", "ftjax.main", "--config=" + CONFIG, "--workdir=gs://b/x/r2", "--config.data.name=a b"]
    assert wait_for(home / "cwd").strip() == str(home / "ftjax")
    assert wait_for(home / "ftjax-logs" / "latest.log").strip() == "training"
    assert os.readlink(home / "ftjax-logs" / "latest.log") == "r2.log"

    # While a run is going, another is refused on that worker.
    (home / "ftjax-logs" / "latest.pid").unlink()
    (home / "ftjax-logs" / "latest.pid").write_text(str(os.getpid()))
    w = on_worker(home, remote_command(ssh))
    assert w.returncode == 1 and "a run is still going" in w.stderr


def test_stop_worker_line_ends_the_run(tmp_path, env):
    home = fake_worker(tmp_path, 'echo $$ > "$HOME/child"; exec sleep 60\n')
    r = launch("run.sh", *SETTINGS, "--workers=1", "--config=" + CONFIG, "--workdir=gs://b/x/long", "-n", env=env)
    w = on_worker(home, remote_command(dry_commands(r.stdout)[0]))
    assert w.returncode == 0, w.stderr
    child = int(wait_for(home / "child"))
    r = launch("stop.sh", *SETTINGS, "-n", env=env)
    (ssh,) = dry_commands(r.stdout)
    assert "--worker=all" in ssh
    w = on_worker(home, remote_command(ssh))
    assert w.returncode == 0 and "stopped latest" in w.stdout, w.stderr
    end = time.time() + 10
    while time.time() < end:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        os.kill(child, 9)
        raise AssertionError("the run survived stop.sh")


# --- logs -------------------------------------------------------------------------------------

def test_logs(env):
    r = launch("logs.sh", *SETTINGS, "-n", env=env)
    (ssh,) = dry_commands(r.stdout)
    assert "--worker=0" in ssh
    assert remote_command(ssh) == 'tail -n 100 -F "$HOME/ftjax-logs/latest.log"'
    r = launch("logs.sh", *SETTINGS, "--all", "--run-name=r2", "--no-follow", "--lines=5", env=env)
    assert r.returncode == 0, r.stderr
    (ssh,) = calls(env)
    assert "--worker=all" in ssh
    assert remote_command(ssh).startswith('tail -n 5 "$HOME/ftjax-logs/r2.log" 2>&1 | sed -u')


# --- fetch ------------------------------------------------------------------------------------

def test_fetch_dry_run(env, tmp_path):
    r = launch("fetch.sh", "--workdir=gs://bkt/x/r1/", f"--dest={tmp_path}/res", "-n", env=env)
    assert r.returncode == 0, r.stderr
    assert dry_commands(r.stdout) == [["mkdir", "-p", f"{tmp_path}/res/r1"]] + [
        ["gcloud", "storage", "cp", f"gs://bkt/x/r1/{f}", f"{tmp_path}/res/r1/{f}"]
        for f in ("summary.json", "metrics.jsonl", "config.json")]
    assert not (tmp_path / "res").exists()


def test_fetch_copies_each_run(env, tmp_path):
    r = launch("fetch.sh", "gs://bkt/s/a", "gs://bkt/s/b", f"--dest={tmp_path}/res", "--gsutil", env=env)
    assert r.returncode == 0, r.stderr
    assert [c[:2] for c in calls(env)] == [["gsutil", "-q"]] * 6
    for run in ("a", "b"):
        for f in ("summary.json", "metrics.jsonl", "config.json"):
            assert json.loads((tmp_path / "res" / run / f).read_text()) == {"from": f"gs://bkt/s/{run}/{f}"}


def test_fetch_unfinished_run_exits_1(env, tmp_path):
    env["STUB_MISSING"] = "b/summary.json"
    r = launch("fetch.sh", "gs://bkt/s/a", "gs://bkt/s/b", f"--dest={tmp_path}/res", env=env)
    assert r.returncode == 1
    assert r.stderr.splitlines()[-1] == "fetch.sh: error: no summary.json (not finished, or failed) in: gs://bkt/s/b"
    assert (tmp_path / "res" / "a" / "summary.json").exists()


def test_fetch_from_the_vm(env, tmp_path):
    r = launch("fetch.sh", *SETTINGS, "--workdir=/home/me/runs/r3", f"--dest={tmp_path}", "-n", env=env)
    scp = dry_commands(r.stdout)[1]
    assert scp == ["gcloud", "compute", "tpus", "tpu-vm", "scp", "tpu-a:/home/me/runs/r3/summary.json",
                   f"{tmp_path}/r3/summary.json", "--zone=us-central2-b", "--project=proj-x", "--worker=0"]


# --- delete -----------------------------------------------------------------------------------

def test_delete(env):
    r = launch("delete.sh", *SETTINGS, "--dry-run", env=env)
    assert dry_commands(r.stdout) == [["gcloud", "compute", "tpus", "tpu-vm", "delete", "tpu-a",
                                       "--zone=us-central2-b", "--project=proj-x", "--quiet"]]
    assert calls(env) == []
    r = launch("delete.sh", *SETTINGS, "--queued", "--yes", env=env)
    assert r.returncode == 0, r.stderr
    assert calls(env) == [["gcloud", "compute", "tpus", "queued-resources", "delete", "tpu-a",
                           "--zone=us-central2-b", "--project=proj-x", "--force", "--quiet"]]


def test_delete_without_yes_and_no_terminal_refuses(env):
    r = launch("delete.sh", *SETTINGS, env=env)
    assert r.returncode == 2
    assert r.stderr.splitlines() == ["delete.sh: error: not deleting TPU VM tpu-a without --yes (no terminal to ask on)"]
    assert calls(env) == []


# --- sweep ------------------------------------------------------------------------------------

GRID = ["--grid", "config.method=lora,full", "--grid", "config.optimizer.lr=1e-4,3e-4,1e-3"]


def test_sweep_dry_run_on_the_tpu(env):
    r = launch("sweep.sh", *SETTINGS, "--accelerator-type=v4-16", "--config=" + CONFIG,
               "--workdir-root=gs://bkt/sweep", *GRID, "--config.seed=1", "--dry-run", env=env)
    assert r.returncode == 0, r.stderr
    listed = [line for line in r.stdout.splitlines() if line.startswith("# run ")]
    assert len(listed) == 6
    (ssh,) = dry_commands(r.stdout)
    assert "--worker=all" in ssh
    assert ftjax_words(remote_command(ssh)) == []  # the chain is one quoted `bash -c` word: look inside
    chain = [w for w in shlex.split(remote_command(ssh)) if w.startswith("echo \"[1/6]")]
    assert len(chain) == 1
    runs = ftjax_words(chain[0])
    assert len(runs) == 6
    workdirs = [a for run in runs for a in run if a.startswith("--workdir=")]
    assert len(set(workdirs)) == 6 and all(w.startswith("--workdir=gs://bkt/sweep/") for w in workdirs)
    assert runs[0] == ["--config=" + CONFIG, "--workdir=gs://bkt/sweep/method-lora_optimizer.lr-1e-4",
                       "--distributed", "--config.seed=1", "--config.method=lora", "--config.optimizer.lr=1e-4"]
    assert runs[5][-2:] == ["--config.method=full", "--config.optimizer.lr=1e-3"]
    assert calls(env) == []


def test_sweep_runs_a_grid_file_with_the_names_of_ftjax_sweep(env, tmp_path):
    grid = tmp_path / "grid.py"
    grid.write_text("def get_grid(arg=None):\n"
                    "    return {'config': 'configs/bert_sst2.py:demo', 'fixed': {'num_epochs': 1.0},\n"
                    "            'points': [{'method': m} for m in arg.split('+')], 'seeds': (0, 1)}\n")
    r = launch("sweep.sh", *SETTINGS, "--workers=1", "--workdir-root=gs://bkt/g", f"--grid-file={grid}:lora+full",
               f"--python={sys.executable}", "--dry-run", env=env)
    assert r.returncode == 0, r.stderr
    (ssh,) = dry_commands(r.stdout)
    chain = [w for w in shlex.split(remote_command(ssh)) if w.startswith("echo \"[1/4]")]
    runs = ftjax_words(chain[0])
    assert [a for run in runs for a in run if a.startswith("--workdir=")] == [
        f"--workdir=gs://bkt/g/method-{m}_seed-{s}" for m in ("lora", "full") for s in (0, 1)]
    assert runs[3] == ["--config=configs/bert_sst2.py:demo", "--workdir=gs://bkt/g/method-full_seed-1",
                       "--config.num_epochs=1.0", "--config.method=full", "--config.seed=1"]
    r = launch("sweep.sh", *SETTINGS, "--workdir-root=gs://bkt/g", f"--grid-file={grid}:lora", *GRID,
               f"--python={sys.executable}", "--dry-run", env=env)
    assert r.returncode != 0 and "not both" in r.stderr


def test_sweep_on_the_tpu_is_one_ssh(env):
    r = launch("sweep.sh", *SETTINGS, "--workers=1", "--config=" + CONFIG, "--workdir-root=gs://bkt/sw", *GRID, env=env)
    assert r.returncode == 0, r.stderr
    (ssh,) = calls(env)
    assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "tpu-a"] and "--worker=all" in ssh
    assert "launch/fetch.sh gs://bkt/sw/method-lora_optimizer.lr-1e-4" in r.stderr


def test_sweep_worker_line_runs_every_cell_in_order(tmp_path, env):
    home = fake_worker(tmp_path, 'printf "%s\\n" "$*" >> "$HOME/all_args"\n')
    r = launch("sweep.sh", *SETTINGS, "--workers=1", "--config=" + CONFIG, "--workdir-root=gs://bkt/sw",
               "--grid=method=lora,full", "-n", env=env)
    (ssh,) = dry_commands(r.stdout)
    w = on_worker(home, remote_command(ssh))
    assert w.returncode == 0, w.stderr
    log = home / "ftjax-logs" / "sw.log"
    end = time.time() + 10
    while "[2/2] method-full: exit 0" not in (log.read_text() if log.exists() else ""):
        assert time.time() < end, log.read_text() if log.exists() else "no sweep log"
        time.sleep(0.05)
    lines = (home / "all_args").read_text().splitlines()
    assert [line.split()[3] for line in lines] == ["--workdir=gs://bkt/sw/method-lora",
                                                   "--workdir=gs://bkt/sw/method-full"]


def test_sweep_local_dry_run(env, tmp_path):
    r = launch("sweep.sh", "--local", "--config=" + CONFIG, f"--workdir-root={tmp_path}/sw", *GRID, "-n", env=env)
    assert r.returncode == 0, r.stderr
    cmds = dry_commands(r.stdout)
    assert len(cmds) == 6
    assert all(c[:3] == ["python", "-m", "ftjax.main"] and "--distributed" not in c for c in cmds)
    assert len({c[4] for c in cmds}) == 6
    assert cmds[1] == ["python", "-m", "ftjax.main", "--config=" + CONFIG,
                       f"--workdir={tmp_path}/sw/method-lora_optimizer.lr-3e-4",
                       "--config.method=lora", "--config.optimizer.lr=3e-4"]
    assert calls(env) == []


def test_sweep_local_runs_each_cell_and_reports_failures(env, tmp_path):
    fake = tmp_path / "fakepython"
    fake.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$*" >> "$FAKE_LOG"\n[[ "$*" != *method=full* ]]\n')
    fake.chmod(0o755)
    env["FAKE_LOG"] = str(tmp_path / "runs.txt")
    r = launch("sweep.sh", "--local", f"--python={fake}", "--config=" + CONFIG, f"--workdir-root={tmp_path}/sw",
               "--grid", "method=lora,full", "--grid", "seed=0,1", env=env)
    assert r.returncode == 1
    assert len((tmp_path / "runs.txt").read_text().splitlines()) == 4
    assert r.stderr.splitlines()[-1] == "sweep.sh: error: 2 of 4 runs failed: method-full_seed-0 method-full_seed-1"


@pytest.mark.parametrize("grid,message", [
    (["--grid", "method=lora", "--grid", "config.method=full"], "--grid method given twice"),
    (["--grid", "method=lora,,full"], "empty value"),
    (["--grid", "method"], "bad --grid 'method'"),
    ([], "missing --grid"),
    (["--grid", "model.name=a/b,a-b"], "same workdir name 'model.name-a-b'"),
])
def test_sweep_bad_grid(grid, message, env, tmp_path):
    r = launch("sweep.sh", "--local", "--config=" + CONFIG, f"--workdir-root={tmp_path}", *grid, "-n", env=env)
    assert r.returncode == 2
    (line,) = r.stderr.splitlines()
    assert message in line


# --- shellcheck -------------------------------------------------------------------------------

def test_shellcheck():
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        if os.environ.get("FTJAX_REQUIRE_SHELLCHECK") == "1":
            pytest.fail("shellcheck is required here (FTJAX_REQUIRE_SHELLCHECK=1) but is not on PATH")
        pytest.skip("shellcheck is not on PATH (apt-get install shellcheck); FTJAX_REQUIRE_SHELLCHECK=1 makes this fail")
    scripts = sorted(str(p.relative_to(REPO)) for p in LAUNCH.glob("*.sh")) + ["results/tables/run_all.sh"]
    r = subprocess.run([shellcheck, *scripts], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
