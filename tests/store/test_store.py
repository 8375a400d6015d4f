"""The artifact store: content hashes, the tokenizer check on open, temporaries of killed runs, locks."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from bam_pipeline.errors import BamError
from bam_pipeline.store import artifacts, locks
from bam_pipeline.store.artifacts import Artifact, publish, read_artifact, remove_dead_temporaries, write_manifest
from bam_pipeline.store.locks import Holder, StageLock, read_holder, stale_reason, wait_while_held


def _artifact(path, weights: bytes, log: str, inputs=None, tokenizer="tok-a") -> Artifact:
    with publish(path) as tmp:
        (tmp / "model.safetensors").write_bytes(weights)
        (tmp / "train_log.jsonl").write_text(log)
        write_manifest(tmp, stage="seed", name="main", config={"a": 1}, inputs=inputs, tokenizer_hash=tokenizer)
    return read_artifact(path)


def test_the_hash_covers_content_and_inputs_not_the_train_log(tmp_path):
    a = _artifact(tmp_path / "a", b"weights", '{"step": 1, "tokens_per_s": 812.5}\n')
    b = _artifact(tmp_path / "b", b"weights", '{"step": 1, "tokens_per_s": 1907.0}\n')  # retrained, other speed
    assert a.hash == b.hash and a.manifest["files"]["train_log.jsonl"] != b.manifest["files"]["train_log.jsonl"]
    assert _artifact(tmp_path / "c", b"weight!", "").hash != a.hash
    assert _artifact(tmp_path / "d", b"weights", "", inputs={"seed": a}).hash != a.hash
    b.verify()  # the train log is still checksummed
    (b.path / "train_log.jsonl").write_text("edited")
    with pytest.raises(BamError, match="checksum mismatch .*train_log.jsonl"):
        b.verify()


def test_a_file_the_manifest_does_not_list_is_refused_not_read_unchecked(tmp_path):
    """Tampered weights whose name was taken out of the manifest's file list (and a file added after publishing)
    would otherwise load without a checksum."""
    art = _artifact(tmp_path / "seed", b"weights", "")
    m = json.loads((art.path / "manifest.json").read_text())
    del m["files"]["model.safetensors"]
    (art.path / "manifest.json").write_text(json.dumps(m))
    (art.path / "model.safetensors").write_bytes(b"tampered")
    with pytest.raises(BamError, match="holds model.safetensors, which its manifest's file list does not name"):
        read_artifact(art.path).verify()
    other = _artifact(tmp_path / "other", b"weights", "")
    (other.path / "extra.safetensors").write_bytes(b"added later")
    with pytest.raises(BamError, match=f"{other.path} holds extra.safetensors.*delete {other.path}"):
        other.verify()


def test_opening_for_a_run_checks_the_tokenizer(tmp_path):
    art = _artifact(tmp_path / "seed", b"w", "", tokenizer="a" * 64)
    assert read_artifact(art.path, tokenizer="a" * 64).hash == art.hash
    with pytest.raises(BamError) as err:
        read_artifact(art.path, tokenizer="b" * 64)
    assert str(err.value) == ("seed was made with another tokenizer (aaaaaaaaaaaa) than the run's prepared data "
                              "(bbbbbbbbbbbb); re-run its stage so the whole run shares one tokenizer")


def test_the_model_loader_casts_floating_weights_to_the_dtype_asked_and_keeps_integer_buffers(tmp_path):
    """store.artifacts.load_model is the one loader (bam_pipeline.load calls it): float32 as built by
    default, or every floating tensor in ``dtype``; the hash table stays int64 either way."""
    import torch

    from bam_pipeline.model import BAMTransformer, RouterConfig, preset
    from bam_pipeline.store.artifacts import load_model, save_model

    cfg = preset("smoke").replace(ffn_experts=2, ffn_router=RouterConfig("hash"))
    state = BAMTransformer(cfg).state_dict()
    with publish(tmp_path / "mix" / "hash") as tmp:
        save_model(tmp, cfg, state)
        write_manifest(tmp, stage="mix", name="hash", config={})
    art = read_artifact(tmp_path / "mix" / "hash")
    model, got = load_model(art)
    assert got == cfg and not model.training
    assert all(torch.equal(model.state_dict()[k], state[k]) and model.state_dict()[k].dtype == state[k].dtype
               for k in state)
    half = load_model(art, dtype=torch.bfloat16)[0].state_dict()
    assert half["layers.0.ffn.router.table"].dtype == torch.int64
    assert torch.equal(half["layers.0.ffn.router.table"], state["layers.0.ffn.router.table"])
    floating = [k for k in state if state[k].is_floating_point()]
    assert floating and all(torch.equal(half[k], state[k].to(torch.bfloat16)) for k in floating)
    assert all(half[k].dtype == torch.bfloat16 for k in floating)


def test_temporaries_of_dead_processes_are_removed_and_live_ones_kept(tmp_path):
    final = tmp_path / "seed" / "main"
    final.parent.mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    live = subprocess.Popen(["sleep", "30"])
    try:
        for name in (f"main.tmp-{dead.pid}", f"main.old-{dead.pid}", f"main.tmp-{live.pid}", "main.tmp-notapid"):
            (final.parent / name).mkdir()
        removed = remove_dead_temporaries(final)
        assert {p.name for p in removed} == {f"main.tmp-{dead.pid}", f"main.old-{dead.pid}"}
        assert {p.name for p in final.parent.iterdir()} == {f"main.tmp-{live.pid}", "main.tmp-notapid"}
    finally:
        live.kill()


# ---- locks ----------------------------------------------------------------------------------
def _holder_file(path, **fields):
    now = time.time()
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job": None, "started": now, "renewed": now,
              **fields}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(holder))
    return Holder(**holder)


@pytest.fixture
def sleeper():
    p = subprocess.Popen(["sleep", "60"])
    yield p.pid
    p.kill()


def test_a_lock_is_exclusive_and_released(tmp_path, sleeper):
    path = tmp_path / ".locks" / "seed" / "main.lock"
    with StageLock(path, "seed") as lock:
        assert read_holder(path) == lock.holder and lock.holder.pid == os.getpid()
    assert not path.exists()
    _holder_file(path, pid=sleeper)  # another live process on this host
    with pytest.raises(BamError, match=f"seed is being built by another run \\(pid {sleeper} on "):
        StageLock(path, "seed").acquire()
    assert read_holder(path).pid == sleeper  # the holder's lock is untouched


@pytest.mark.parametrize("why,fields,env", [
    ("its process", {"pid": 2**22 + 12345}, {}),  # a pid that runs nowhere here
    ("not renewed", {"host": "elsewhere", "pid": 1, "renewed": time.time() - locks.LEASE_S - 5}, {}),
    ("this SLURM job's own", {"host": "elsewhere", "pid": 1, "slurm_job": "777"}, {"SLURM_JOB_ID": "777"}),
    ("not written by us", None, {}),
])
def test_stale_locks_are_taken_over(tmp_path, monkeypatch, capsys, why, fields, env):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    path = tmp_path / "main.lock"
    if fields is None:
        path.write_text("garbage")
    else:
        _holder_file(path, **fields)
    with StageLock(path, "seed"):
        assert read_holder(path).pid == os.getpid()
    out = capsys.readouterr().out
    assert "taking over the lock" in out and (why in out or why == "not written by us")


def test_on_one_host_the_holders_process_decides_in_a_slurm_job_too(tmp_path, monkeypatch, sleeper):
    """The jobs of hydra/launcher=local inside one SLURM allocation share SLURM_JOB_ID: a live sibling's lock
    holds; a dead one's, or one whose pid now names a process started after the lock, is taken over."""
    monkeypatch.setenv("SLURM_JOB_ID", "777")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    path = tmp_path / "main.lock"
    _holder_file(path, pid=sleeper, slurm_job="777")
    with pytest.raises(BamError, match=f"being built by another run \\(pid {sleeper} on .*SLURM job 777"):
        StageLock(path, "seed").acquire()
    now = time.time()
    assert stale_reason(Holder(socket.gethostname(), 2**22 + 12345, "777", now, now)) == \
        f"its process {2**22 + 12345} is gone"
    # a lock taken an hour ago by a pid that now names the sleeper, started seconds ago: its holder is gone
    assert stale_reason(Holder(socket.gethostname(), sleeper, "777", now - 3600, now)) == \
        f"its process {sleeper} is gone (the pid now names a process started after the lock)"


def test_a_slurm_job_that_no_longer_runs_leaves_a_stale_lock(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    squeue = bin_dir / "squeue"
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    holder = Holder("node-3", 1, "4242", time.time(), time.time())
    squeue.write_text("#!/bin/sh\necho RUNNING\n")
    squeue.chmod(0o755)
    assert stale_reason(holder) is None
    squeue.write_text("#!/bin/sh\nexit 0\n")  # no longer queued: prints nothing
    assert stale_reason(holder) == "its SLURM job 4242 no longer runs"


def test_the_lease_is_renewed_while_held(tmp_path, monkeypatch):
    monkeypatch.setattr(locks, "RENEW_S", 0.05)
    path = tmp_path / "main.lock"
    with StageLock(path, "seed") as lock:
        first = read_holder(path).renewed
        time.sleep(0.3)
        assert read_holder(path).renewed > first and read_holder(path).started == lock.holder.started


def test_waiting_for_an_input_ends_when_its_builder_does(tmp_path, sleeper):
    path = tmp_path / "data.lock"
    _holder_file(path, pid=sleeper)
    lines = []
    releaser = threading.Timer(0.5, path.unlink)
    releaser.start()
    wait_while_held(path, "the prepared data", timeout_s=30, poll_s=0.05, say=lines.append)
    assert lines and "the prepared data is being built by pid" in lines[0]
    _holder_file(path, pid=sleeper)
    with pytest.raises(BamError, match="waited 0 s for the prepared data, which pid .* is building; raise "
                                       "pipeline.wait_s"):
        wait_while_held(path, "the prepared data", timeout_s=0.2, poll_s=0.05, say=lines.append)


class _Stop(BaseException):
    """What a stop signal's handler raises, wherever the program is."""


@pytest.mark.parametrize("where", ["mkdir", "body", "second rename"])
def test_a_stop_anywhere_in_a_publish_leaves_the_previous_output_and_no_temporary(tmp_path, monkeypatch, where):
    final = tmp_path / "seed" / "main"
    final.mkdir(parents=True)
    (final / "weights").write_text("previous")
    real_mkdir, real_rename = type(final).mkdir, type(final).rename

    def mkdir(self, *args, **kwargs):  # the directory made, the stop landing before the next statement
        real_mkdir(self, *args, **kwargs)
        if where == "mkdir" and ".tmp-" in self.name:
            raise _Stop()

    def rename(self, target):
        if where == "second rename" and ".tmp-" in self.name:
            raise _Stop()  # the previous output moved aside, the new one not yet in place
        return real_rename(self, target)

    monkeypatch.setattr(type(final), "mkdir", mkdir)
    monkeypatch.setattr(type(final), "rename", rename)
    if where == "second rename":  # only where the OS cannot swap two directories in one step
        monkeypatch.setattr(artifacts, "exchange", lambda a, b: False)
    with pytest.raises(_Stop):
        with publish(final) as tmp:
            (tmp / "weights").write_text("new")
            if where == "body":
                raise _Stop()
    assert (final / "weights").read_text() == "previous"
    assert sorted(p.name for p in final.parent.iterdir()) == ["main"]


def test_replacing_an_output_never_leaves_a_moment_without_it(tmp_path, monkeypatch):
    """export.overwrite=true while a server loads the export: after every filesystem step of the replace the
    output is there, whole (the old one, then the new one)."""
    final = tmp_path / "export" / "moe" / "bam"
    with publish(final) as tmp:
        (tmp / "model.safetensors").write_text("old")
    seen = []
    real_rename, real_rmtree, real_exchange = Path.rename, artifacts.shutil.rmtree, getattr(artifacts, "exchange", None)

    def look():
        seen.append((final / "model.safetensors").read_text() if final.is_dir() else None)

    def rename(self, target):
        out = real_rename(self, target)
        look()
        return out

    def exchange(a, b):
        out = real_exchange(a, b)
        look()
        return out

    monkeypatch.setattr(Path, "rename", rename)
    if real_exchange is not None:
        monkeypatch.setattr(artifacts, "exchange", exchange)
    monkeypatch.setattr(artifacts.shutil, "rmtree", lambda *a, **k: (real_rmtree(*a, **k), look()))
    with publish(final) as tmp:
        (tmp / "model.safetensors").write_text("new")
    assert seen and None not in seen and seen[-1] == "new", seen
    assert sorted(p.name for p in final.parent.iterdir()) == ["bam"]  # the old one removed, no temporary left


def test_exchange_swaps_two_directories(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "f").write_text("a")
    (b / "f").write_text("b")
    if not artifacts.exchange(a, b):
        pytest.skip("this OS or filesystem cannot swap two directories in one step")
    assert (a / "f").read_text() == "b" and (b / "f").read_text() == "a"
