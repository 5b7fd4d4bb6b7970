"""The on-disk model registry: registration, states, promotion, rollback, pruning,
crash safety (SIGKILL between every step of a change) and two processes at once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from distilld.registry import Manifest, ModelRegistry, RegistryError

DAEMON_DIR = Path(__file__).resolve().parents[1] / "daemon"


def _model(tmp_path: Path, name: str, *, reference: bool = False) -> Path:
    directory = tmp_path / "trained" / name
    directory.mkdir(parents=True)
    (directory / "model.safetensors").write_bytes(name.encode())
    (directory / "config.json").write_text("{}")
    if reference:
        (directory / "reference.parquet").write_bytes(b"ref")
    return directory


def _registry(tmp_path: Path, n: int = 2, keep_last: int = 5) -> ModelRegistry:
    registry = ModelRegistry(tmp_path / "registry", keep_last=keep_last)
    for i in range(n):
        registry.register(_model(tmp_path, f"m{i}"), Manifest(task="reviews"))
    return registry


def _live_on_disk(registry: ModelRegistry) -> list[str]:
    """Versions whose manifest file itself says live."""
    live = []
    for path in sorted((registry.root / "versions").glob("*/manifest.json")):
        if json.loads(path.read_text())["state"] == "live":
            live.append(path.parent.name)
    return live


def _states(registry: ModelRegistry) -> dict[str, str]:
    return {m.version: m.state for m in registry.list()}


# --------------------------------------------------------------------------- basics


def test_register_moves_the_model_and_writes_the_manifest(tmp_path: Path) -> None:
    registry = ModelRegistry(tmp_path / "registry")
    source = _model(tmp_path, "a", reference=True)
    version = registry.register(
        source,
        Manifest(
            parent=None,
            task="reviews",
            data={"examples": 1000, "dropped": {"low_confidence": 12}},
            method={"distill": {"temperature": 2.0}},
            metrics={"accuracy": 0.97},
            gate_report="gate.json",
            reference_distribution="reference.parquet",
        ),
    )
    assert version == "v0001"
    assert not source.exists()
    directory = registry.path(version)
    assert (directory / "model.safetensors").read_bytes() == b"a"
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["state"] == "candidate"
    assert manifest["data"]["examples"] == 1000
    assert manifest["reference_distribution"] == "reference.parquet"
    assert manifest["created_at"] > 0
    assert registry.get(version).metrics == {"accuracy": 0.97}
    assert registry.live() is None

    copied = registry.register(_model(tmp_path, "b"), Manifest(parent=version), copy=True)
    assert copied == "v0002" and (tmp_path / "trained" / "b").exists()
    named = registry.register(_model(tmp_path, "c"), Manifest(version="2024-q3.1"))
    assert named == "2024-q3.1"
    assert [m.version for m in registry.list()] == ["v0001", "v0002", "2024-q3.1"]
    assert registry.register(_model(tmp_path, "d")) == "v0003"


def test_register_refuses_bad_input(tmp_path: Path) -> None:
    registry = _registry(tmp_path, 1)
    with pytest.raises(RegistryError, match="does not exist"):
        registry.register(tmp_path / "missing")
    with pytest.raises(RegistryError, match="already exists"):
        registry.register(_model(tmp_path, "x"), Manifest(version="v0001"))
    with pytest.raises(RegistryError, match="promote"):
        registry.register(_model(tmp_path, "y"), Manifest(state="live"))
    with pytest.raises(RegistryError, match="invalid version name"):
        registry.register(_model(tmp_path, "z"), Manifest(version="../escape"))
    with pytest.raises(RegistryError, match="reference distribution"):
        registry.register(_model(tmp_path, "w"), Manifest(reference_distribution="ref.parquet"))
    source = _model(tmp_path, "v")
    (source / "manifest.json").write_text("{}")
    with pytest.raises(RegistryError, match=r"already contains a manifest\.json"):
        registry.register(source)
    with pytest.raises(RegistryError, match="not in the registry"):
        registry.get("v0099")


@pytest.mark.parametrize("name", ["v1\n", "v0001\n", "good\n", "v1\nv2"])
def test_a_version_name_with_a_newline_is_refused(tmp_path: Path, name: str) -> None:
    # The pattern ends in "$", which re.match lets match before a final newline.
    registry = _registry(tmp_path, 1)
    with pytest.raises(RegistryError, match="invalid version name"):
        registry.register(_model(tmp_path, "n"), Manifest(version=name))
    with pytest.raises(RegistryError, match="invalid version name"):
        registry.path(name)
    with pytest.raises(RegistryError, match="invalid version name"):
        registry.promote(name)


@pytest.mark.parametrize("copy", [False, True])
def test_register_fsyncs_every_file_and_directory_before_the_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, copy: bool
) -> None:
    # After a power loss LIVE must never name a truncated weights file: every file
    # of the version, and its directories, reach the disk before the version exists.
    registry = ModelRegistry(tmp_path / "registry")
    source = _model(tmp_path, "a")
    (source / "tokenizer").mkdir()
    (source / "tokenizer" / "vocab.txt").write_text("a\nb\n")
    synced: list[tuple[str, bool]] = []  # (path, the version already renamed into place)
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        path = os.readlink(f"/proc/self/fd/{fd}")
        renamed = any((registry.root / "versions").iterdir())
        synced.append((path, renamed))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    version = registry.register(source, Manifest(task="reviews"), copy=copy)

    final = registry.path(version)
    staged = {Path(path) for path, renamed in synced if not renamed}
    for relative in ("model.safetensors", "config.json", "tokenizer/vocab.txt", "tokenizer"):
        assert any(
            p.parts[-len(Path(relative).parts) :] == Path(relative).parts and ".staging" in p.parts
            for p in staged
        ), relative
        assert (final / relative).exists()
    assert any(p.parent.name == ".staging" for p in staged)  # the version directory itself
    assert (str(registry.root / "versions"), True) in synced  # its name, after the rename


def test_promote_and_rollback(tmp_path: Path) -> None:
    registry = _registry(tmp_path, 3)
    registry.set_state("v0001", "shadow")
    live = registry.promote("v0001")
    assert live.state == "live" and registry.live_version() == "v0001"
    assert registry.previous_live() is None
    registry.promote("v0002")
    registry.promote("v0003")
    assert _states(registry) == {"v0001": "retired", "v0002": "retired", "v0003": "live"}
    assert registry.previous_live() == "v0002"
    assert registry.promote("v0003").state == "live"  # promoting the live one: no change

    back = registry.rollback()
    assert back.version == "v0002"
    assert _states(registry) == {"v0001": "retired", "v0002": "live", "v0003": "rolled_back"}
    registry.rollback()
    assert registry.live_version() == "v0001"
    with pytest.raises(RegistryError, match="no previous version"):
        registry.rollback()
    assert _live_on_disk(registry) == ["v0001"]


def test_state_rules(tmp_path: Path) -> None:
    registry = _registry(tmp_path, 2)
    with pytest.raises(RegistryError, match="nothing to roll back"):
        registry.rollback()
    registry.promote("v0001")
    with pytest.raises(RegistryError, match="is live"):
        registry.set_state("v0001", "retired")
    with pytest.raises(RegistryError, match="promote"):
        registry.set_state("v0002", "live")
    assert registry.set_state("v0002", "shadow").state == "shadow"
    updated = registry.update("v0002", metrics={"shadow_agreement": 0.97})
    assert registry.get("v0002").metrics == {"shadow_agreement": 0.97} == updated.metrics
    with pytest.raises(RegistryError, match="cannot change"):
        registry.update("v0002", state="live")


def test_keep_last_never_deletes_live_previous_or_shadow(tmp_path: Path) -> None:
    registry = _registry(tmp_path, 2, keep_last=2)
    registry.promote("v0001")
    registry.promote("v0002")  # live v0002, previous v0001
    for name in ("c", "d"):
        registry.register(_model(tmp_path, name))
    # v0003 and v0004 are the newest two; v0001 (previous) and v0002 (live) stay.
    assert [m.version for m in registry.list()] == ["v0001", "v0002", "v0003", "v0004"]
    registry.set_state("v0003", "shadow")
    registry.register(_model(tmp_path, "e"))
    assert [m.version for m in registry.list()] == ["v0001", "v0002", "v0003", "v0004", "v0005"]
    registry.set_state("v0003", "retired")
    assert registry.prune() == ["v0003"]
    registry.promote("v0005")  # previous is now v0002: v0001 may go
    assert [m.version for m in registry.list()] == ["v0002", "v0004", "v0005"]
    assert registry.pointer() is not None and registry.pointer().previous == ("v0002",)  # type: ignore[union-attr]
    assert registry.rollback().version == "v0002"
    assert not any((registry.root / ".trash").iterdir())
    with pytest.raises(RegistryError, match="at least 2"):
        ModelRegistry(tmp_path / "other", keep_last=1)


def test_readers_see_one_live_version_after_an_interrupted_switch(tmp_path: Path) -> None:
    registry = _registry(tmp_path, 2)
    registry.promote("v0001")
    # What a crash right after writing LIVE leaves: the pointer moved, the
    # manifests did not.
    (registry.root / "LIVE").write_text(
        json.dumps({"version": "v0002", "previous": ["v0001"], "retire": "v0001"})
    )
    assert _live_on_disk(registry) == ["v0001"]
    assert _states(registry) == {"v0001": "retired", "v0002": "live"}
    registry.repair()
    assert _live_on_disk(registry) == ["v0002"]


# --------------------------------------------------------------------------- crashes

_CRASH_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    from distilld import registry as module
    from distilld.registry import steps

    root, action, step = sys.argv[1], sys.argv[2], sys.argv[3]
    keep_last = int(sys.argv[4]) if len(sys.argv) > 4 else 5

    def hook(name):
        if name == step:
            os.kill(os.getpid(), signal.SIGKILL)

    steps._test_hook = hook
    reg = module.ModelRegistry(root, keep_last=keep_last)
    if action == "rollback":
        reg.rollback()
    elif action.startswith("register:"):
        reg.register(action.split(":", 1)[1])
    else:
        reg.promote(action)
    print("finished")
    """
)


def _run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "crash.py"
    script.write_text(_CRASH_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(DAEMON_DIR)}
    return subprocess.run(
        [sys.executable, str(script), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


PROMOTE_STEPS = [
    "lock:acquired",
    "promote:locked",
    "promote:pointer_written",
    "promote:new_marked",
    "promote:old_marked",
    "promote:pruned",
    "lock:releasing",
]


@pytest.mark.parametrize("step", PROMOTE_STEPS)
def test_sigkill_during_promote_leaves_one_consistent_live_version(
    tmp_path: Path, step: str
) -> None:
    registry = _registry(tmp_path, 2)
    registry.promote("v0001")
    result = _run(tmp_path, str(registry.root), "v0002", step)
    assert result.returncode == -9, result.stderr
    assert "finished" not in result.stdout

    after = ModelRegistry(registry.root)
    switched = PROMOTE_STEPS.index(step) >= PROMOTE_STEPS.index("promote:pointer_written")
    expected = "v0002" if switched else "v0001"
    assert after.live_version() == expected
    states = _states(after)
    assert [v for v, s in states.items() if s == "live"] == [expected]
    # The next change (or a repair at start-up) brings the files in line.
    after.repair()
    assert _live_on_disk(after) == [expected]
    other = "v0001" if switched else "v0002"
    assert _states(after)[other] == ("retired" if switched else "candidate")
    # And the registry keeps working: the interrupted promotion can be redone.
    assert after.promote("v0002").state == "live"
    assert _live_on_disk(after) == ["v0002"]


ROLLBACK_STEPS = ["rollback:locked", "rollback:pointer_written", "rollback:new_marked"]


@pytest.mark.parametrize("step", ROLLBACK_STEPS)
def test_sigkill_during_rollback(tmp_path: Path, step: str) -> None:
    registry = _registry(tmp_path, 2)
    registry.promote("v0001")
    registry.promote("v0002")
    result = _run(tmp_path, str(registry.root), "rollback", step)
    assert result.returncode == -9, result.stderr
    after = ModelRegistry(registry.root)
    after.repair()
    if step == "rollback:locked":
        assert after.live_version() == "v0002"
        assert _states(after) == {"v0001": "retired", "v0002": "live"}
    else:
        assert after.live_version() == "v0001"
        assert _states(after) == {"v0001": "live", "v0002": "rolled_back"}
    assert len(_live_on_disk(after)) == 1


@pytest.mark.parametrize("step", ["register:staged", "register:manifest_written"])
def test_sigkill_during_register_leaves_no_half_version(tmp_path: Path, step: str) -> None:
    registry = _registry(tmp_path, 1)
    source = _model(tmp_path, "new")
    result = _run(tmp_path, str(registry.root), f"register:{source}", step)
    assert result.returncode == -9, result.stderr
    after = ModelRegistry(registry.root)
    assert [m.version for m in after.list()] == ["v0001"]
    after.repair()
    assert not any((after.root / ".staging").iterdir())
    assert after.register(_model(tmp_path, "again")) == "v0002"


def test_sigkill_during_prune_leaves_a_usable_rollback_stack(tmp_path: Path) -> None:
    registry = _registry(tmp_path, 2, keep_last=2)
    registry.promote("v0001")
    registry.promote("v0002")
    registry.register(_model(tmp_path, "c"))
    registry.register(_model(tmp_path, "d"))
    # Promoting v0003 prunes v0001 (not among the last two, not the previous live).
    result = _run(tmp_path, str(registry.root), "v0003", "prune:deleted", "2")
    assert result.returncode == -9, result.stderr
    after = ModelRegistry(registry.root, keep_last=2)
    assert after.live_version() == "v0003"
    assert [m.version for m in after.list()] == ["v0002", "v0003", "v0004"]
    after.repair()
    assert after.pointer() is not None and after.pointer().previous == ("v0002",)  # type: ignore[union-attr]
    assert after.rollback().version == "v0002"
    with pytest.raises(RegistryError, match="no previous version"):
        after.rollback()


# --------------------------------------------------------------------------- concurrency

_CONCURRENT_SCRIPT = textwrap.dedent(
    """
    import os, sys, time
    from distilld import registry as module
    from distilld.registry import steps

    root, log, versions = sys.argv[1], sys.argv[2], sys.argv[3].split(",")
    me = str(os.getpid())

    def hook(name):
        if name == "lock:acquired":
            with open(log, "a") as f:
                f.write(f"enter {me}\\n")
            time.sleep(0.005)  # hold the lock a moment: overlaps would show
        elif name == "lock:releasing":
            with open(log, "a") as f:
                f.write(f"exit {me}\\n")

    steps._test_hook = hook
    reg = module.ModelRegistry(root)
    for i in range(15):
        reg.promote(versions[i % len(versions)])
    """
)


def test_two_processes_promoting_at_once_never_overlap(tmp_path: Path) -> None:
    registry = _registry(tmp_path, 4)
    script = tmp_path / "concurrent.py"
    script.write_text(_CONCURRENT_SCRIPT)
    log = tmp_path / "lock.log"
    env = {**os.environ, "PYTHONPATH": str(DAEMON_DIR)}
    processes = [
        subprocess.Popen(
            [sys.executable, str(script), str(registry.root), str(log), versions],
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        for versions in ("v0001,v0002", "v0003,v0004")
    ]
    for process in processes:
        _, stderr = process.communicate(timeout=120)
        assert process.returncode == 0, stderr

    lines = log.read_text().splitlines()
    assert len(lines) == 2 * 2 * 15
    for enter, leave in zip(lines[::2], lines[1::2], strict=True):
        kind_in, pid_in = enter.split()
        kind_out, pid_out = leave.split()
        assert (kind_in, kind_out) == ("enter", "exit")
        assert pid_in == pid_out  # nobody else entered in between
    assert len({line.split()[1] for line in lines}) == 2

    live = registry.live_version()
    assert live in {"v0001", "v0003"}  # each process promotes its first version last
    assert [v for v, s in _states(registry).items() if s == "live"] == [live]
    assert _live_on_disk(registry) == [live]
