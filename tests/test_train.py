"""Training on a real local Ray: schedule, optimiser, a short run, checkpoints, resume, export."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from dncut.config import load_config
from dncut.train.checkpoints import STATE_FILE
from dncut.train.loop import build_model, build_optimizer, lr_schedule

SMOKE = "configs/train/smoke.yaml"


def smoke_config(tmp_path: Path, *overrides: str):
    return load_config(SMOKE, [f"output_dir={tmp_path}", *overrides])


# ----------------------------------------------------------------------------- pure parts


def test_lr_schedule_hand_values():
    s = lr_schedule(1.0, 0.0, warmup=4, total=9)
    assert len(s) == 9
    assert np.allclose(s[:4], [0.25, 0.5, 0.75, 1.0])
    # cosine over the remaining 5 steps from peak to final: 1, .854, .5, .146, 0
    assert np.allclose(s[4:], [0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(5)])
    assert lr_schedule(2.0, 1e-3, warmup=0, total=3)[0] == pytest.approx(2.0)


def test_optimizers_and_no_decay_groups(tmp_path):
    for name in ("adamw", "lars"):
        cfg = smoke_config(tmp_path, f"train.optimizer={name}")
        model = build_model(cfg)
        opt = build_optimizer(model, cfg)
        decay, no_decay = opt.param_groups
        assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim <= 1 for p in no_decay["params"])
        assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == cfg.train.weight_decay
        n = sum(p.numel() for g in opt.param_groups for p in g["params"])
        assert n == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_model_forward_backward_shapes(tmp_path):
    """One two-view batch through the model and the loss: finite loss, grads on the encoder."""
    from dncut.data.scenes import make_scene
    from dncut.train.loop import build_loss
    from dncut.views import TwoViewTransform

    cfg = smoke_config(tmp_path, "loss.min_pass=1")
    model = build_model(cfg)
    t = TwoViewTransform(size=cfg.data.crop_size)
    rows = [t(make_scene(i, size=128)[0], np.random.default_rng(i)) for i in range(3)]
    batch = {k: torch.stack([torch.as_tensor(r[k]) for r in rows]) for k in rows[0]}
    out = model(batch["view1"], batch["view2"], batch["box1"], batch["box2"], batch["flip1"], batch["flip2"])
    s = cfg.data.crop_size // model.encoder.stride
    assert out.shape == (s, s) and out.ab.z_online.shape == (3, s * s)
    assert not out.ab.z_target.requires_grad
    loss, parts = build_loss(cfg).symmetric(out.ab, out.ba, shape=out.shape)
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in model.encoder.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


ONE_WORKER_STEPS = """
import json, sys
import numpy as np, torch, torch.distributed as dist
import torch._C._distributed_c10d as c10d
from dncut.config import load_config
from dncut.data.pipeline import ViewMaker, file_key
from dncut.data.scenes import make_scene
from dncut.train.loop import LoopState, build_loss, build_model, build_optimizer, train_one_step, step_metrics, union

folder = sys.argv[1]
dist.init_process_group("gloo", init_method=f"file://{folder}/pg", rank=0, world_size=1)
cfg = load_config("configs/train/smoke.yaml", ["data.crop_size=32"])
maker, rows = ViewMaker(cfg), []
for i in range(cfg.train.batch_size):
    make_scene(i, size=64)[0].save(f"{folder}/{i}.jpg")
    rows.append(maker({"uri": f"{folder}/{i}.jpg", "epoch": 0, "key": file_key(str(i))}))
batch = {k: torch.from_numpy(np.stack([r[k] for r in rows])) for k in rows[0] if not isinstance(rows[0][k], str)}
model, criterion = build_model(cfg), build_loss(cfg)
optimizer, state = build_optimizer(model, cfg), LoopState()
sched = np.full(3, 1e-4)
for _ in range(3):
    train_one_step(model, criterion, optimizer, batch, 1e-4, state, cfg, torch.device("cpu"))
m = step_metrics(state, 3, sched, torch.device("cpu"))
u = union({"a.jpg"})
entries = json.loads(c10d._dump_fr_trace_json(True, False)).get("entries", [])  # all held, not only active
dist.destroy_process_group()
print(json.dumps({"entries": len(entries), "step": state.step, "union": sorted(u), "skipped": m["skipped_rows"]}))
"""


def test_one_worker_steps_leave_nothing_in_the_collective_flight_recorder(tmp_path):
    """torch.distributed's flight recorder keeps every collective (with its tracebacks) in a ring of
    TORCH_FR_BUFFER_SIZE entries; the loop made two per step on one worker (~1.9 MB held after 600 steps,
    heaptrack). On one worker the loop now makes none; the recorder is checked to record Gloo's."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("TORCH_FR_BUFFER_SIZE", "TORCH_NCCL_TRACE_BUFFER_SIZE")}

    run = subprocess.run([sys.executable, "-c", ONE_WORKER_STEPS, str(tmp_path)], capture_output=True,
                         text=True, timeout=300, cwd=Path(__file__).resolve().parents[1], env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out == {"entries": 0, "step": 3, "union": ["a.jpg"], "skipped": 0}
    probe = ("import json, sys, torch, torch.distributed as d\n"
             "import torch._C._distributed_c10d as c\n"
             "d.init_process_group('gloo', init_method=f'file://{sys.argv[1]}', rank=0, world_size=1)\n"
             "for _ in range(2100): d.all_reduce(torch.zeros(1))\n"
             "print(len(json.loads(c._dump_fr_trace_json(True, False)).get('entries', [])))\n"
             "d.destroy_process_group()")
    held = {}
    for name, extra in (("default", {}), ("off", {"TORCH_FR_BUFFER_SIZE": "0"})):
        done = subprocess.run([sys.executable, "-c", probe, str(tmp_path / f"probe_{name}")], capture_output=True,
                              text=True, timeout=120, env={**env, **extra})
        held[name] = done.stdout.strip() or done.stderr[-2000:]
    # the recorder is on (so the 0 above means something); its ring keeps torch's default 2,000 entries
    # and TORCH_FR_BUFFER_SIZE=0 turns it off: what README "Faults and load" tells multi-worker users
    assert held == {"default": "2000", "off": "0"}


FRAGMENTED_HEAP = """
import ctypes, json
from dncut.runtime import release_freed_memory

libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]


def rss_anon_mib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("RssAnon:"))


blocks = [libc.malloc(64 * 1024) for _ in range(3200)]  # 200 MiB in 64 KiB chunks: below the mmap threshold
for b in blocks:
    ctypes.memset(b, 1, 64 * 1024)
filled = rss_anon_mib()
for b in blocks[:-1]:  # the newest stays allocated above the freed ones: the heap top cannot shrink
    libc.free(b)
freed = rss_anon_mib()
released = release_freed_memory()
print(json.dumps({"filled": filled, "freed": freed, "released": released, "after": rss_anon_mib()}))
"""


def test_release_freed_memory_returns_what_glibc_keeps(tmp_path):
    """glibc keeps freed heap chunks below a live one (they stay in the RSS); the loop's
    ``release_freed_memory`` after each report must hand them back. Measured from the kernel's side
    (RssAnon), in a fresh process."""
    import platform
    import subprocess
    import sys

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("malloc_trim is glibc's")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
    run = subprocess.run([sys.executable, "-c", FRAGMENTED_HEAP], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1], env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["filled"] - out["freed"] < 20, f"free() alone returned the heap: nothing to test ({out})"
    assert out["released"] is True
    assert out["freed"] - out["after"] > 150, f"the 200 MiB freed stayed resident ({out})"


def test_every_report_releases_freed_memory(monkeypatch, tmp_path):
    """``report`` (rank != 0: no chief) hands the metrics to Ray Train, then releases freed memory."""
    import ray.train

    import dncut.train.worker as worker
    from dncut.train.loop import LoopState

    calls = []
    monkeypatch.setattr(ray.train, "report", lambda metrics, **kw: calls.append(("report", metrics["step"])))
    monkeypatch.setattr(worker, "release_freed_memory", lambda: calls.append(("release",)) or True)
    cfg = smoke_config(tmp_path)
    state = LoopState(step=3)
    worker.report(None, None, state, 5, np.full(5, 1e-4), cfg, None, torch.device("cpu"))
    assert calls == [("report", 3), ("release",)]


# ----------------------------------------------------------------------------- real Ray runs


@pytest.mark.ray
def test_train_workers_start_with_the_allocator_environment(ray_session, tmp_path, monkeypatch):
    """``WORKER_ENV`` must reach the Train worker processes through dncut's ``run_config`` (set in the
    driver, the workers would not see it): a TorchTrainer with dncut's RunConfig reports what its
    worker's environment holds."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from dncut.runtime import WORKER_ENV
    from dncut.train.driver import run_config

    def loop(config):  # Ray Train v2 keeps metrics only with a checkpoint: the worker writes a file
        import json
        import os

        with open(config["out"], "w") as f:
            json.dump({name: os.environ.get(name, "unset") for name in config["names"]}, f)

    monkeypatch.delenv("MIMALLOC_PURGE_DELAY", raising=False)  # a CI's own value would be passed on
    cfg, out = smoke_config(tmp_path), tmp_path / "worker_env.json"
    TorchTrainer(loop, train_loop_config={"names": sorted(WORKER_ENV), "out": str(out)},
                 scaling_config=ray.train.ScalingConfig(num_workers=1), run_config=run_config(cfg)).fit()
    assert json.loads(out.read_text()) == {"MIMALLOC_PURGE_DELAY": "0"}


@pytest.mark.ray
def test_a_users_own_worker_environment_wins(ray_session, tmp_path, monkeypatch):
    """A variable of ``WORKER_ENV`` that the user set is not overridden: one in the job's ``runtime_env``
    (the session's ``ray.init`` sets OMP_NUM_THREADS=1 there; the workers inherit it) is left out, one in
    the driver's environment (which remote workers do not inherit) is passed on."""
    from dncut.runtime import WORKER_ENV
    from dncut.train.driver import run_config

    cfg = smoke_config(tmp_path)
    monkeypatch.setitem(WORKER_ENV, "OMP_NUM_THREADS", "8")
    monkeypatch.setitem(WORKER_ENV, "DNCUT_TEST_WORKER_VAR", "1")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # only the job's runtime_env holds it now
    monkeypatch.setenv("MIMALLOC_PURGE_DELAY", "7")
    assert run_config(cfg).worker_runtime_env == {"env_vars": {"MIMALLOC_PURGE_DELAY": "7",
                                                               "DNCUT_TEST_WORKER_VAR": "1"}}


def _checkpoint_states(run: Path) -> dict[int, dict]:
    states = {}
    for f in run.glob("*/checkpoint_*/" + STATE_FILE):  # run_dir/fit_<time>/checkpoint_<time>/
        st = torch.load(f, map_location="cpu", weights_only=True)
        states[int(st["step"])] = st
    return states


@pytest.mark.ray
def test_train_checkpoint_resume_and_export(ray_session, tmp_path):
    from dncut.backbones import create_backbone
    from dncut.train import fit

    staged = set(Path(tempfile.gettempdir()).glob("dncut-ckpt-*"))
    cfg = smoke_config(tmp_path, "train.max_steps=4", "train.checkpoint_every=2", "train.keep_checkpoints=5")
    result = fit(cfg, progress=True)
    assert result.error is None if hasattr(result, "error") else True
    run = Path(cfg.run_dir)
    first = _checkpoint_states(run)
    assert sorted(first) == [2, 4]
    # what a run folder holds besides checkpoints: history, TensorBoard events, curves, worker log
    from dncut.tracking import read_history

    assert [m["step"] for m in read_history(str(run))] == [1, 2, 3, 4]  # smoke: log_every 1
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert (run / "curves.png").read_bytes().startswith(b"\x89PNG")
    assert "exported the finetuned backbone" in (run / "train.log").read_text()
    assert set(Path(tempfile.gettempdir()).glob("dncut-ckpt-*")) <= staged, "staged checkpoint folders left behind"

    # same run name, longer run: resumes at step 4 with the optimiser state of step 4
    cfg2 = smoke_config(tmp_path, "train.max_steps=6", "train.checkpoint_every=2", "train.keep_checkpoints=5")
    finished = fit(cfg2)
    states = _checkpoint_states(run)
    assert sorted(states) == [2, 4, 6]
    adam_steps = {int(v["step"]) for v in states[6]["optimizer"]["state"].values()}
    assert adam_steps == {6}, "AdamW's step counter must continue from the checkpoint (restart would give 2)"
    # the exported backbone loads in dncut and its keys load into the plain timm-style model
    export = run / "backbone.pth"
    assert export.exists()
    loaded = create_backbone(cfg.model.backbone, pretrained=False, checkpoint=str(export))
    trained = states[6]["model"]
    enc = {k[len("encoder."):]: v for k, v in trained.items() if k.startswith("encoder.")}
    mine = loaded.state_dict()
    common = [k for k in enc if k in mine]
    assert common and all(torch.equal(enc[k], mine[k]) for k in common)

    # the finished run run again: no worker, no new fit folder; the result of the fit that finished it
    fits, history = sorted(run.glob("fit_*")), (run / "metrics.jsonl").read_text()
    again = fit(cfg2)
    assert sorted(run.glob("fit_*")) == fits and (run / "metrics.jsonl").read_text() == history
    assert again.metrics == finished.metrics and again.metrics["step"] == 6
    assert again.checkpoint.path == finished.checkpoint.path and again.error is None
    # the end reached but not marked (an older dncut; a driver lost before the mark): the workers start,
    # train nothing, mark the run; fit returns the finished run's result all the same
    manifest = json.loads((run / "checkpoints.json").read_text())
    (run / "checkpoints.json").write_text(json.dumps({"checkpoints": manifest["checkpoints"]}))
    unmarked = fit(cfg2)
    assert len(list(run.glob("fit_*"))) == len(fits) + 1 and (run / "metrics.jsonl").read_text() == history
    assert unmarked.metrics == finished.metrics and unmarked.checkpoint.path == finished.checkpoint.path
    assert json.loads((run / "checkpoints.json").read_text())["finished"]["step"] == 6


def test_a_finished_run_is_one_whose_last_step_is_checkpointed_marked_and_exported(tmp_path):
    """``finished_result``: a rerun skips training only when the manifest's "finished" mark, the
    newest intact checkpoint and the run's length agree and the export is there; a checkpoint
    recorded after the mark (the run extended) drops the mark."""
    from dncut.train.checkpoints import (EXPORT_FILE, MANIFEST_FILE, PROGRESS_FILE, clear_finished, finished_at,
                                         record, record_finished)
    from dncut.train.driver import finished_result

    cfg = smoke_config(tmp_path).with_absolute_paths()
    store, run = cfg.storage_handle(), Path(cfg.run_dir)
    folder = run / "fit_1" / "checkpoint_6"
    folder.mkdir(parents=True)
    (folder / STATE_FILE).write_bytes(b"x" * 4)
    (folder / PROGRESS_FILE).write_text(json.dumps({"step": 6, "state_bytes": 4}))
    record(str(run), store, "fit_1/checkpoint_6", 6)
    (run / EXPORT_FILE).write_bytes(b"weights")
    assert finished_result(cfg, 6) is None  # checkpointed and exported, not marked: the end was not reached
    record_finished(str(run), store, 6, {"step": 6, "loss": 0.5})
    done = finished_result(cfg, 6)
    assert done.metrics == {"step": 6, "loss": 0.5} and done.checkpoint.path == str(folder)
    assert done.path == str(run / "fit_1")
    assert finished_result(cfg, 8) is None  # a longer run: train on
    (run / EXPORT_FILE).unlink()
    assert finished_result(cfg, 6) is None  # the export gone: the worker writes it again
    (run / EXPORT_FILE).write_bytes(b"weights")
    (folder / STATE_FILE).write_bytes(b"x" * 2)  # the newest checkpoint truncated: resume from it is not possible
    assert finished_result(cfg, 6) is None
    (folder / STATE_FILE).write_bytes(b"x" * 4)
    assert finished_result(cfg, 6) is not None
    manifest = json.loads((run / MANIFEST_FILE).read_text())
    (run / MANIFEST_FILE).write_text(json.dumps({**manifest, "finished": {"step": 6}}))  # no metrics: not a mark
    assert finished_at(str(run), store) is None and finished_result(cfg, 6) is None
    (run / MANIFEST_FILE).write_text(json.dumps(manifest))
    clear_finished(str(run), store)  # training past the mark began
    assert finished_result(cfg, 6) is None and json.loads((run / MANIFEST_FILE).read_text())["checkpoints"]
    record_finished(str(run), store, 6, {"step": 6, "loss": 0.5})
    record(str(run), store, "fit_2/checkpoint_8", 8)  # the run extended: no longer finished
    assert finished_at(str(run), store) is None and finished_result(cfg, 6) is None
    assert json.loads((run / MANIFEST_FILE).read_text())["checkpoints"][-1] == {"name": "fit_2/checkpoint_8", "step": 8}


def test_resume_point_skips_a_broken_newest_checkpoint(tmp_path, caplog):
    """The checkpoint a rerun resumes from: the newest intact one of the run folder, found by listing
    it (real files): a truncated ``progress.json``, a ``state.pt`` shorter than recorded and a deleted
    ``state.pt`` are skipped with a warning that names them; a deleted folder is simply gone; a
    ``progress.json`` outside a checkpoint folder does not count; no checkpoint = 0."""
    from dncut.train.checkpoints import PROGRESS_FILE, STATE_FILE, intact_checkpoints, resume_point, resume_step

    cfg = smoke_config(tmp_path)
    store = cfg.storage_handle()
    run = Path(cfg.run_dir)
    assert resume_step(cfg) == 0 and resume_point(str(run), store) is None

    def checkpoint(name: str, step: int, size: int = 4, written: int | None = None) -> Path:
        (run / name).mkdir(parents=True)
        (run / name / STATE_FILE).write_bytes(b"x" * (size if written is None else written))
        (run / name / PROGRESS_FILE).write_text(json.dumps({"step": step, "state_bytes": size}))
        return run / name

    checkpoint("fit_1/checkpoint_a", 2)
    checkpoint("fit_1/checkpoint_b", 4)
    checkpoint("fit_2/checkpoint_c", 6, written=2)  # truncated state.pt: 2 of 4 bytes
    (checkpoint("fit_2/checkpoint_d", 8) / PROGRESS_FILE).write_text('{"st')  # truncated progress.json
    (checkpoint("fit_2/checkpoint_e", 10) / STATE_FILE).unlink()  # state.pt deleted
    (run / PROGRESS_FILE).write_text('{"step": 99}')  # not in a checkpoint folder: not counted
    assert intact_checkpoints(str(run), store) == {"fit_1/checkpoint_a": 2, "fit_1/checkpoint_b": 4}
    with caplog.at_level("WARNING", logger="dncut.train"):
        ref = resume_point(str(run), store, say=True)
    assert (ref.name, ref.step) == ("fit_1/checkpoint_b", 4) and resume_step(cfg) == 4
    assert "fit_2/checkpoint_c: state.pt holds 2 of 4 bytes" in caplog.text
    assert "fit_2/checkpoint_d: unreadable progress.json" in caplog.text
    assert "fit_2/checkpoint_e: no state.pt" in caplog.text
    assert "resuming from fit_1/checkpoint_b (step 4)" in caplog.text
    shutil.rmtree(run / "fit_1" / "checkpoint_b")  # the newest intact one deleted as a whole
    assert resume_point(str(run), store).step == 2
    checkpoint("fit_3/checkpoint_f", 12)  # a newer one uploaded by a later fit wins
    assert resume_step(cfg) == 12


def test_no_module_of_the_train_package_reads_rays_snapshot():
    """dncut keeps its own record of checkpoints; Ray Train's private run snapshot is neither read
    nor written anywhere in ``dncut/train/``."""
    import dncut.train

    folder = Path(dncut.train.__file__).parent
    sources = {p.name: p.read_text() for p in folder.glob("*.py")}
    assert {"loop.py", "checkpoints.py", "worker.py", "driver.py", "found.py"} <= set(sources)
    assert not [n for n, text in sources.items() if "checkpoint_manager_snapshot" in text or "get_checkpoint(" in text]


def test_the_loop_imports_no_ray():
    """``dncut.train.loop`` (and the rank-0 duties) run without Ray: importing them in a fresh process
    leaves ``ray`` out of ``sys.modules``."""
    import subprocess
    import sys

    code = ("import sys, dncut.train.loop, dncut.train.chief, dncut.train.checkpoints; "
            "print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parents[1])
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().splitlines()[-1] == "[]"


def test_what_ray_unpickles_to_plan_a_run_imports_no_torch(tmp_path):
    """Ray Train's controller, dataset manager and split coordinator unpickle the training function
    and the dataset's row function before the first step: in a fresh process they load without
    torch (``dncut.train.entry``, ``dncut.data.deferred``); the row function then makes exactly the
    rows ``ViewMaker`` makes."""
    import pickle
    import subprocess
    import sys

    import ray.cloudpickle

    from dncut.data.deferred import Deferred
    from dncut.data.pipeline import ViewMaker
    from dncut.train.entry import train_loop_per_worker

    cfg = smoke_config(tmp_path)
    deferred = Deferred("dncut.data.pipeline:ViewMaker", cfg.model_dump(mode="json"))
    blob = tmp_path / "plan.pkl"
    blob.write_bytes(ray.cloudpickle.dumps((train_loop_per_worker, deferred)))
    code = (f"import pickle, sys; fn, maker = pickle.loads(open({str(blob)!r}, 'rb').read()); "
            "print(callable(fn), callable(maker), 'torch' in sys.modules)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parents[1])
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["True", "True", "False"]
    row = {"uri": "scene://7", "epoch": 1, "key": 3}
    got, want = pickle.loads(pickle.dumps(deferred))(row), ViewMaker(cfg)(row)
    assert got.keys() == want.keys() and got["ok"]
    for key in want:
        np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(want[key]))


@pytest.mark.ray
def test_checkpoints_kept_by_val_iou(ray_session, tmp_path):
    """``train.keep_checkpoints_by: val_iou`` keeps the best-scoring checkpoints (and the newest)."""
    from dncut.tracking import read_history
    from dncut.train import PROGRESS_FILE, fit

    cfg = smoke_config(tmp_path, "train.max_steps=5", "train.checkpoint_every=1", "train.val_every=1",
                       "train.keep_checkpoints=2", "train.keep_checkpoints_by=val_iou", "train.lr=0.05")
    fit(cfg)
    run = Path(cfg.run_dir)
    val = {m["step"]: m["val_iou"] for m in read_history(str(run)) if m.get("val_step") == m["step"]}
    assert sorted(val) == [1, 2, 3, 4, 5]
    kept = sorted(json.loads(p.read_text())["step"] for p in run.glob(f"*/checkpoint_*/{PROGRESS_FILE}"))
    dropped = set(val) - set(kept)
    assert 5 in kept and len(kept) <= 3 and dropped, (val, kept)  # the newest stays, to resume from
    for d in dropped:  # every dropped checkpoint scored below two kept ones (ties may go either way)
        assert sum(val[k] >= val[d] for k in kept) >= 2, (val, kept)
