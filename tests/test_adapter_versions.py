"""Adapter versions on disk (issue #29 points 13, 14): publishing with --overwrite is one atomic,
fsynced step for a poller, and the gateway deletes a version's snapshot as soon as no request
holds it and it is no longer current (not only at shutdown). Remote mode's snapshots on the
shared volume are tested with the scripted upstreams in tests/test_deploy_remote_fake.py."""

from __future__ import annotations

import asyncio
import errno
import gc
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from clients.launch import free_port
from server.adapter_registry import AdapterRegistry
from server.app import create_app
from server.backend import Delta, LoraRef
from server.settings import ServerSettings
from tests.adapters_util import make_fake_adapter, make_peft_adapter
from tests.fakes import FakeBackend
from tests.server_proc import ROOT, ServerProcess, serve_in_thread
from vbon import adapters as adapters_mod
from vbon.adapters import AdapterMeta, staged_folder
from vbon.sampling import Sampling

FILES = {"adapter_config.json", "adapter_model.safetensors", "vbon.json"}


def publish(folder: Path, k: int, valid: bool = False) -> None:
    """Publish version k of an adapter with --overwrite semantics. valid: a real adapter whose
    vbon.json says steps=k (for the registry); else placeholder files that each carry k, so a
    reader can tell a consistent folder from a mix (fast, for the raw folder poller)."""
    with staged_folder(folder, overwrite=True) as tmp:
        if valid:
            make_fake_adapter(tmp, seed=k)
            meta = AdapterMeta.model_validate_json((tmp / "vbon.json").read_text())
            (tmp / "vbon.json").write_text(meta.model_copy(update={"steps": k}).model_dump_json())
        else:
            for name in FILES:
                (tmp / name).write_text(json.dumps({"k": k, "pad": "x" * 4096}))


# The poller runs in another process, truly in parallel with the publisher: a thread would
# share the GIL with it and rarely run in the instant between two renames.
POLLER = r"""
import json, os, sys
from pathlib import Path
from server.adapter_registry import AdapterRegistry

adapters, name, stop = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
files_expected = set(sys.argv[4:])
registry = AdapterRegistry(adapters, max_rank=16)
polls, problems = 0, []

def identity(folder):
    st = folder.stat()  # (through a symlink: the folder it points at)
    return st.st_dev, st.st_ino, st.st_ctime_ns

while not stop.exists():
    polls += 1
    folder = registry._candidates().get(name)  # what the gateway's scan sees
    if folder is None:
        problems.append("missing from the scan")
        continue
    try:
        before = identity(folder)
        files = set(os.listdir(folder))
        ks = {json.loads((folder / f).read_text())["k"] for f in files & files_expected}
        after = identity(folder)
    except (OSError, ValueError):
        if name not in registry._candidates():
            problems.append("missing while being read")
        continue  # swapped while read: the previous folder is being deleted
    if before != after:
        continue
    if not files >= files_expected:
        problems.append(f"half-written: {sorted(files)}")
    elif len(ks) != 1:
        problems.append(f"mixed versions {sorted(ks)}")
print(json.dumps({"polls": polls, "problems": problems[:20], "count": len(problems)}))
"""


def _overwrite_under_a_poller(adapters: Path, rounds: int) -> dict:
    """Overwrite adapter 'a' `rounds` times while another process polls it as the gateway
    does. A read that straddles a swap (the folder is another one after the read than before
    it: the registry notices the same through its fingerprint and tries again) is no fault;
    the adapter missing from the listing is, and so is a folder that is the same before and
    after the read but lacks files or holds files of different versions."""
    stop = adapters.parent / "stop-polling"
    poller = subprocess.Popen(
        [sys.executable, "-c", POLLER, str(adapters), "a", str(stop), *sorted(FILES)],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )
    try:
        time.sleep(0.5)  # (its imports)
        for k in range(1, rounds + 1):
            publish(adapters / "a", k)
    finally:
        stop.touch()
        out, _ = poller.communicate(timeout=60)
    return json.loads(out)


def _no_exchange(a: Path, b: Path) -> None:
    """rename_exchange as on NFS or a non-Linux system."""
    raise OSError(errno.EINVAL, "Invalid argument")


def test_overwrite_never_shows_a_poller_no_adapter_or_half_of_one(tmp_path: Path) -> None:
    adapters = tmp_path / "adapters"
    publish(adapters / "a", 0)
    poller = _overwrite_under_a_poller(adapters, rounds=300)
    assert poller["polls"] > 300 and poller["count"] == 0, poller
    assert json.loads((adapters / "a" / "vbon.json").read_text())["k"] == 300
    # Nothing left behind: no temporary or previous folders.
    assert sorted(p.name for p in adapters.iterdir()) == ["a"]
    assert (adapters / "a").is_dir() and not (adapters / "a").is_symlink()


def test_without_rename_exchange_overwrites_switch_a_symlink_atomically(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As on NFS: no RENAME_EXCHANGE. The first overwrite turns the folder into a symlink to a
    # hidden versioned folder (one non-atomic step); every later one is atomic.
    monkeypatch.setattr(adapters_mod, "rename_exchange", _no_exchange)
    adapters = tmp_path / "adapters"
    publish(adapters / "a", 0)
    publish(adapters / "a", 1)
    assert (adapters / "a").is_symlink()
    assert not os.path.isabs(os.readlink(adapters / "a"))  # works under any mount point
    poller = _overwrite_under_a_poller(adapters, rounds=200)
    assert poller["polls"] > 200 and poller["count"] == 0, poller
    assert json.loads((adapters / "a" / "vbon.json").read_text())["k"] == 200
    hidden = [p.name for p in adapters.iterdir() if p.name.startswith(".")]
    assert hidden == [os.readlink(adapters / "a")]  # only the version served is kept
    # A user's own symlink target is never deleted by an overwrite.
    mine = tmp_path / "elsewhere"
    publish(mine, 7)
    (adapters / "b").symlink_to(mine)
    publish(adapters / "b", 8)
    assert json.loads((mine / "vbon.json").read_text())["k"] == 7
    assert json.loads((adapters / "b" / "vbon.json").read_text())["k"] == 8


def test_rename_exchange_swaps_two_folders(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "x").write_text("a"), (b / "x").write_text("b")
    try:
        adapters_mod.rename_exchange(a, b)
    except OSError as exc:  # (an OS or filesystem without it: the symlink path covers it)
        assert exc.errno in adapters_mod._NO_EXCHANGE
        pytest.skip(f"no RENAME_EXCHANGE here: {exc}")
    assert (a / "x").read_text() == "b" and (b / "x").read_text() == "a"


def test_published_files_and_folder_are_fsynced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to name file descriptors")
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    adapters = tmp_path / "adapters"
    for k in (0, 1):  # a first publish, then an overwrite
        synced.clear()
        publish(adapters / "a", k)
        names = {Path(p).name for p in synced}
        assert names >= FILES, synced  # every file's data
        assert str(adapters) in synced  # the folder holding the new name
        # ... and the published folder itself (fsynced under its temporary name).
        assert any(Path(p).name.startswith(".a.tmp-") for p in synced), synced


# -- point 13: snapshots go when their last request ends ---------------------------------


def _snapshots(reg: AdapterRegistry) -> list[str]:
    assert reg._private is not None
    return sorted(p.name for p in reg._private.iterdir())


def test_a_superseded_snapshot_is_deleted_when_its_last_request_ends(tmp_path: Path) -> None:
    adapters = tmp_path / "adapters"
    publish(adapters / "a", 1, valid=True)

    async def main() -> None:
        reg = AdapterRegistry(adapters, max_rank=16)
        await reg.scan()
        held = reg.get("a")  # a request in flight on version 1
        v1 = Path(held.ref.path)
        assert v1.is_dir()

        publish(adapters / "a", 2, valid=True)
        await reg.scan()
        await reg.settled()
        assert v1.is_dir() and len(_snapshots(reg)) == 2  # still in use
        assert reg.get("a").version > held.version
        ref = held.ref  # the engine call holds only the LoRA ref: that is enough
        del held
        gc.collect()
        await reg.settled()
        assert v1.is_dir()
        del ref  # the request ends
        await reg.settled()
        assert not v1.exists() and len(_snapshots(reg)) == 1

        # Nothing holds version 2 when version 3 arrives: it goes at once.
        v2 = Path(reg.get("a").ref.path)
        publish(adapters / "a", 3, valid=True)
        await reg.scan()
        await reg.settled()
        assert not v2.exists() and len(_snapshots(reg)) == 1
        for lookup in (lambda: reg.for_n(8), reg.default):  # every lookup holds
            held = lookup()
            publish(adapters / "a", held.version + 10, valid=True)
            await reg.scan()
            await reg.settled()
            assert Path(held.ref.path).is_dir() and len(_snapshots(reg)) == 2
            del held
            await reg.settled()
            assert len(_snapshots(reg)) == 1

        # A removed adapter's snapshot also waits for its requests.
        held = reg.get("a")
        shutil.rmtree(adapters / "a")
        await reg.scan()
        assert Path(held.ref.path).is_dir() and reg.all() == []
        del held
        await reg.settled()
        assert _snapshots(reg) == []
        reg.close()
        assert not reg._private.exists()

    asyncio.run(main())


def test_a_refused_version_leaves_no_snapshot(tmp_path: Path) -> None:
    adapters = tmp_path / "adapters"
    make_fake_adapter(adapters / "a")

    class Refusing:
        async def load_lora(self, ref: object) -> None:
            raise RuntimeError("engine refused it")

    async def main() -> None:
        reg = AdapterRegistry(adapters, max_rank=16, backend=Refusing())
        changes = await reg.scan()
        assert "engine refused it" in changes["refused"]["a"]
        assert _snapshots(reg) == []
        reg.close()

    asyncio.run(main())


def test_the_registry_follows_an_adapter_published_as_a_symlink(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(adapters_mod, "rename_exchange", _no_exchange)
    adapters = tmp_path / "adapters"
    publish(adapters / "a", 1, valid=True)
    publish(adapters / "a", 2, valid=True)
    assert (adapters / "a").is_symlink()

    async def main() -> None:
        reg = AdapterRegistry(adapters, max_rank=16)
        await reg.scan()
        assert [v.name for v in reg.all()] == ["a"] and reg.all()[0].meta.steps == 2
        publish(adapters / "a", 3, valid=True)
        assert (await reg.scan())["installed"] == [f"a@v{reg.all()[0].version}"]
        assert reg.all()[0].meta.steps == 3 and len(_snapshots(reg)) == 1
        reg.close()

    asyncio.run(main())


PUBLISHER = """
import sys
from pathlib import Path
from tests.test_adapter_versions import publish

for k in range(1, int(sys.argv[2]) + 1):
    publish(Path(sys.argv[1]), k, valid=True)
"""


def test_registry_under_concurrent_overwrites_always_serves_a_whole_version(
    tmp_path: Path,
) -> None:
    """The gateway's own scan, polling while the trainer (another process) overwrites: the
    adapter is never dropped nor refused, and every installed snapshot is one whole version."""
    adapters = tmp_path / "adapters"
    publish(adapters / "a", 0, valid=True)
    rounds = 40

    async def main() -> list[str]:
        reg = AdapterRegistry(adapters, max_rank=16)
        await reg.scan()
        problems: list[str] = []
        publisher = subprocess.Popen([sys.executable, "-c", PUBLISHER, str(adapters / "a"),
                                      str(rounds)], cwd=ROOT)
        scans = 0
        while True:
            running = publisher.poll() is None
            changes = await reg.scan()
            scans += 1
            if changes["removed"] or changes["refused"]:
                problems.append(f"{changes}")
            current = reg.all()
            if [v.name for v in current] != ["a"]:
                problems.append(f"served {[v.name for v in current]}")
                continue
            snap = Path(current[0].ref.path)
            meta = AdapterMeta.model_validate_json((snap / "vbon.json").read_text())
            if meta.steps != current[0].meta.steps or set(os.listdir(snap)) != FILES:
                problems.append(f"snapshot {sorted(os.listdir(snap))} steps {meta.steps}")
            if not running:
                break
        assert publisher.returncode == 0 and scans > 10
        assert reg.all()[0].meta.steps == rounds  # the last scan (after the last publish)
        assert len(_snapshots(reg)) == 1  # all the superseded ones are gone
        reg.close()
        return problems

    assert asyncio.run(main()) == []


class SlowStreams(FakeBackend):
    """Streams 20 pieces over delay_s seconds."""

    async def stream(
        self, prompt: str, sampling: Sampling, request_id: str, lora: LoraRef | None = None
    ):
        for i in range(20):
            await asyncio.sleep(self.delay_s / 20)
            last = i == 19
            yield Delta(" good", 1, "length" if last else None, -1.0 if last else None, [0])


def test_through_the_api_old_snapshots_go_once_their_stream_ends(tmp_path: Path) -> None:
    """Real HTTP: a stream holds version 1 while version 2 is published; version 1's snapshot
    stays until that stream ends, then it is deleted; plain requests leave nothing behind."""
    adapters = tmp_path / "adapters"
    publish(adapters / "vbon-n8", 1, valid=True)
    fake = SlowStreams(delay_s=1.5)
    settings = ServerSettings(adapters_dir=adapters, adapter_poll_s=0, admin_key="adm",
                              max_tokens_limit=64)
    app = create_app(settings, backend_factory=lambda s: fake, background_load=False)
    admin = {"Authorization": "Bearer adm"}
    with serve_in_thread(app) as url:
        reg = app.state.gateway.registry
        first_chunk = threading.Event()
        done = threading.Event()
        chunks: list[dict] = []

        def stream() -> None:
            with httpx.stream("POST", url + "/v1/vbon", timeout=30,
                              json={"prompt": "a", "stream": True, "max_tokens": 48}) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        chunks.append(json.loads(line[6:]))
                        first_chunk.set()
            done.set()

        threading.Thread(target=stream, daemon=True).start()
        assert first_chunk.wait(10)
        v1 = sorted(_snapshots(reg))
        assert len(v1) == 1
        publish(adapters / "vbon-n8", 2, valid=True)
        assert httpx.post(url + "/admin/adapters/reload", headers=admin).json()["installed"]
        assert len(_snapshots(reg)) == 2  # the stream still uses version 1
        assert done.wait(30)
        assert chunks[-1]["adapter"]["version"] == 1 and chunks[-1]["finish_reason"]
        deadline = time.monotonic() + 5
        while len(_snapshots(reg)) != 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(_snapshots(reg)) == 1 and _snapshots(reg) != v1

        fake.delay_s = 0
        for k in range(3, 6):  # requests between publishes, none in flight at the scan
            r = httpx.post(url + "/v1/vbon", json={"prompt": "a", "max_tokens": 4})
            assert r.status_code == 200, r.text
            r = httpx.post(url + "/v1/completions", json={"model": "vbon", "prompt": ["a", "b"]})
            assert r.status_code == 200, r.text
            publish(adapters / "vbon-n8", k, valid=True)
            fake.calls.clear()
            assert httpx.post(url + "/admin/adapters/reload", headers=admin).json()["installed"]
        deadline = time.monotonic() + 5
        while len(_snapshots(reg)) != 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(_snapshots(reg)) == 1


# -- the same on the real engine (not run in the fast tier) --------------------------------


@pytest.mark.engine
def test_engine_serves_current_versions_after_old_snapshots_are_deleted(
    tmp_path: Path, embedded_model: Path
) -> None:
    """The real vLLM engine with room for one LoRA (VBON_MAX_LORAS=1): switching adapters
    evicts one and reloads the other from its snapshot path. After several overwrites only the
    current snapshots remain in the gateway's temporary folder, and both adapters still answer
    (their snapshots were never deleted under the engine)."""
    adapters = tmp_path / "adapters"
    make_peft_adapter(embedded_model, adapters / "vbon-n8", n=8, seed=0)
    make_peft_adapter(embedded_model, adapters / "vbon-n4", n=4, seed=1)
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    proc = ServerProcess(
        {
            "VBON_ADAPTERS_DIR": str(adapters),
            "VBON_ADAPTER_POLL_S": "0.5",
            "VBON_MAX_LORAS": "1",
            "VBON_MODELS_DIR": str(embedded_model.parent),
            "TMPDIR": str(tmpdir),
        },
        tmp_path / "server.log",
    )

    def snapshots() -> list[Path]:
        return sorted(p for root in tmpdir.glob("vbon-adapters-*") for p in root.iterdir())

    def ask(n: int) -> dict:
        r = httpx.post(proc.url + "/v1/vbon", json={"prompt": "The film was", "n": n,
                                                      "max_tokens": 8}, timeout=120)
        assert r.status_code == 200, r.text
        return r.json()["adapter"]

    def wait_version(name: str, above: int) -> int:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            for a in httpx.get(proc.url + "/ready").json()["adapters"]:
                if a["name"] == name and a["version"] > above:
                    return a["version"]
            time.sleep(0.2)
        raise AssertionError(proc.tail())

    try:
        assert len(snapshots()) == 2
        version = ask(8)["version"]
        for seed in (2, 3, 4):
            with staged_folder(adapters / "vbon-n8", overwrite=True) as tmp:
                make_peft_adapter(embedded_model, tmp, n=8, seed=seed)
            version = wait_version("vbon-n8", version)
            for n in (4, 8, 4, 8):  # one LoRA slot: each switch reloads from the snapshot
                assert ask(n)["name"] == f"vbon-n{n}"
            assert ask(8)["version"] == version
        deadline = time.monotonic() + 10
        while len(snapshots()) != 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(snapshots()) == 2, snapshots()
    finally:
        proc.stop()
    assert list(tmpdir.glob("vbon-adapters-*")) == []  # and none after shutdown


@pytest.mark.engine
def test_engine_restarted_upstream_serves_the_pinned_version(
    tmp_path: Path, embedded_model: Path
) -> None:
    """#29 point 12 on a real `vllm serve`: the live folder is overwritten with a LoRA the
    gateway refuses (it names another base model, but vLLM would load it), the upstream
    restarts, and the greedy answer of the adapter is still v1's: it was loaded again from v1's
    snapshot. Then a valid v2 replaces v1, which the upstream unloads."""
    from tests import test_deploy_remote as remote

    adapters = tmp_path / "adapters"
    make_peft_adapter(embedded_model, adapters / "vbon-n8", n=8, seed=0)
    port = free_port()  # the restart keeps the address
    upstream = remote.VLLMServe(embedded_model, tmp_path / "vllm-1.log", port)
    gateway = None
    greedy = {"messages": remote.MSGS, "temperature": 0, "max_tokens": 16}

    def wait(check: Callable[[dict], bool], what: str, timeout_s: float = 120) -> None:
        assert gateway is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if check(httpx.get(gateway.url + "/ready", timeout=5).json()):
                return
            time.sleep(0.5)
        raise AssertionError(f"{what}: {gateway.tail()}")

    try:
        gateway = ServerProcess(
            {
                "VBON_BACKEND": "remote",
                "VBON_UPSTREAMS": upstream.url,
                "VBON_MODEL": str(embedded_model),
                "VBON_ADAPTERS_DIR": str(adapters),
                "VBON_ADAPTER_POLL_S": "0.5",
                "VBON_UPSTREAM_HEALTH_INTERVAL_S": "1",
                "VBON_UPSTREAM_CONNECT_TIMEOUT_S": "1",
            },
            tmp_path / "gateway.log",
            timeout_s=120,
        )
        r = httpx.post(gateway.url + "/v1/vbon", json=greedy, timeout=120)
        assert r.status_code == 200 and r.json()["adapter"]["version"] == 1, r.text
        v1_text = r.json()["text"]

        with staged_folder(adapters / "vbon-n8", overwrite=True) as tmp:
            make_peft_adapter(embedded_model, tmp, n=8, seed=3)
            meta = AdapterMeta.model_validate_json((tmp / "vbon.json").read_text())
            (tmp / "vbon.json").write_text(
                meta.model_copy(update={"base_model": "/models/gpt2"}).model_dump_json()
            )
        wait(lambda b: "vbon-n8" in b["refused_adapters"], "the new folder is refused")

        upstream.stop()
        upstream = remote.VLLMServe(embedded_model, tmp_path / "vllm-2.log", port)
        wait(lambda b: b["ready"], "the gateway sees the restarted upstream")
        r = httpx.post(gateway.url + "/v1/vbon", json=greedy, timeout=120)
        assert r.status_code == 200 and r.json()["adapter"]["version"] == 1, r.text
        assert r.json()["text"] == v1_text  # v1's weights, not the live folder's

        with staged_folder(adapters / "vbon-n8", overwrite=True) as tmp:
            make_peft_adapter(embedded_model, tmp, n=8, seed=2)
        wait(lambda b: [a["version"] for a in b["adapters"]] == [2], "v2 is installed")
        r = httpx.post(gateway.url + "/v1/vbon", json=greedy, timeout=120)
        assert r.status_code == 200 and r.json()["adapter"]["version"] == 2, r.text
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            served = {m["id"] for m in httpx.get(upstream.url + "/v1/models").json()["data"]}
            if "vbon-n8@v1" not in served:
                break
            time.sleep(0.5)
        assert "vbon-n8@v2" in served and "vbon-n8@v1" not in served, served
        assert list((adapters / ".versions" / "vbon-n8@v1").iterdir()) == []
    finally:
        if gateway is not None:
            gateway.stop()
        upstream.stop()
