"""A run's history is never lost or mixed: the folder lock, metrics.jsonl rewrites and torn lines,
strict JSON, TensorBoard after resumes, damaged checkpoints, config.yaml on resume, divergence."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("transformers")

from support import tiny_config  # noqa: E402

from ppo_fast import cli  # noqa: E402
from ppo_fast.ppo import ConfigError, PPOTrainer  # noqa: E402
from ppo_fast.ppo.checkpoint import list_checkpoints  # noqa: E402
from ppo_fast.ppo.run_folder import RunFolder  # noqa: E402


def quiet(tmp_path, name="run", **overrides):
    return tiny_config(tmp_path / name, **{"steps": 3, **overrides})


def tensorboard_steps(out, tag="ppo/reward_mean"):
    """The steps of the points TensorBoard reads from the folder, in step order: it loads the event
    files in name order, and a name's parts after the time stamp (host, pid, a per-process counter
    compared as text: "10" < "5") do not follow the segments."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(out)
    events.Reload()
    return sorted(e.step for e in events.Scalars(tag))


def kill_during_step(trainer, step):
    real_step = trainer.step

    def step_then_die():
        metrics = real_step()
        if trainer.step_count == step:
            raise KeyboardInterrupt
        return metrics

    trainer.step = step_then_die
    with pytest.raises(KeyboardInterrupt):
        trainer.train()


@pytest.mark.parametrize("save_every, killed_at", [(2, 3), (0, 2)])  # after a checkpoint; before any
def test_tensorboard_has_one_point_per_step_after_a_resume(tmp_path, save_every, killed_at):
    config = quiet(tmp_path, steps=4, save_every=save_every)
    kill_during_step(PPOTrainer(config), killed_at)
    PPOTrainer(config).train(resume=True)
    assert tensorboard_steps(config.out) == [1, 2, 3, 4]
    with open(os.path.join(config.out, "metrics.jsonl")) as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2, 3, 4]


def test_a_folder_in_use_is_refused_and_a_killed_holder_frees_it(tmp_path, capsys):
    out = str(tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from ppo_fast.ppo.run_folder import RunFolder; "
                               f"folder = RunFolder({out!r}); folder.lock(); print('locked', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert cli.main(["train", "--out", out, "--steps", "1", "progress=false"]) == 2
        assert "is in use by a running ppo-fast train (pid" in capsys.readouterr().err
        with pytest.raises(ConfigError, match="in use"):
            RunFolder(out).lock()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    folder = RunFolder(out)
    folder.lock()  # the kernel released the dead process's lock
    folder.close()


def test_metrics_lines_are_strict_json_and_a_torn_last_line_is_dropped(tmp_path):
    folder = RunFolder(str(tmp_path))
    folder.append_metrics({"step": 1, "entropy": float("nan"), "kl": float("inf"), "reward_mean": 0.5})
    folder.append_metrics({"step": 2, "entropy": 1.0, "kl": 0.0, "reward_mean": 0.5})
    with open(folder.metrics_path, "a") as f:
        f.write('{"step": 3, "entr')  # killed mid-write

    def no_constants(name):
        raise ValueError(f"non-standard JSON constant {name}")

    lines = open(folder.metrics_path).read().split("\n")
    assert json.loads(lines[0], parse_constant=no_constants)["entropy"] is None
    assert [m["step"] for m in folder.read_metrics()] == [1, 2]
    folder.keep_metrics_through(5)  # the torn line goes, the steps stay
    assert [m["step"] for m in folder.read_metrics()] == [1, 2]
    assert open(folder.metrics_path).read().endswith('"reward_mean": 0.5}\n')


def test_rewriting_metrics_is_atomic(tmp_path, monkeypatch):
    folder = RunFolder(str(tmp_path))
    for step in range(1, 4):
        folder.append_metrics({"step": step})
    before = open(folder.metrics_path).read()

    def killed(*_args):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", killed)  # killed between the write of the copy and the rename
    with pytest.raises(KeyboardInterrupt):
        folder.keep_metrics_through(1)
    assert open(folder.metrics_path).read() == before


def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(tmp_path):
    config = quiet(tmp_path, steps=2, save_every=1, keep_checkpoints=2)
    PPOTrainer(config).train()
    newest = list_checkpoints(config.out)[-1]
    with open(os.path.join(newest, "policy.safetensors"), "r+b") as f:
        f.truncate(20)
    os.remove(os.path.join(newest, "state.pt"))
    resumed = PPOTrainer(quiet(tmp_path, steps=3, save_every=1, keep_checkpoints=2))
    with pytest.warns(RuntimeWarning, match="is damaged"):
        assert resumed.resume_from_latest()
    assert resumed.step_count == 1


def test_resume_needs_the_runs_config_and_a_failed_resume_keeps_it(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert cli.main(["train", "--out", out, "--resume"]) == 2
    assert "config.yaml' does not exist" in capsys.readouterr().err
    assert cli.main(["train", "--out", out, "--steps", "1", "progress=false", "tensorboard=false",
                     "rollout_batch_size=8", "mini_batch_size=8", "micro_batch_size=4"]) == 0
    saved = open(os.path.join(out, "config.yaml")).read()
    assert cli.main(["train", "--out", out, "--steps", "2", "--resume", "lora_rank=4"]) == 2
    assert "does not match the model" in capsys.readouterr().err
    assert open(os.path.join(out, "config.yaml")).read() == saved
    assert cli.main(["train", "--out", out, "--steps", "2", "--resume"]) == 0


def test_config_is_written_before_the_models_load(tmp_path, monkeypatch):
    from ppo_fast.ppo import trainer

    out = str(tmp_path / "run")

    def killed_while_loading(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer.PPOTrainer, "_load_models", killed_while_loading)
    with pytest.raises(KeyboardInterrupt):
        cli.main(["train", "--out", out, "--steps", "1"])
    assert os.path.isfile(os.path.join(out, "config.yaml"))


def test_a_diverging_run_stops_with_a_clear_message(tmp_path, capsys):
    out = str(tmp_path / "run")
    code = cli.main(["train", "--out", out, "--steps", "20", "lr=1e10", "critic_lr=1e10", "progress=false",
                     "rollout_batch_size=8", "mini_batch_size=4", "micro_batch_size=4", "max_grad_norm=0"])
    assert code == 1
    assert "diverged" in capsys.readouterr().err
    with open(os.path.join(out, "metrics.jsonl")) as f:
        assert all(math.isfinite(json.loads(line)["reward_mean"]) for line in f)


def test_demo_runs_in_a_fresh_folder_each_time(monkeypatch):
    outs = []
    monkeypatch.setattr(cli, "cmd_train", lambda args: outs.append(args.out) or 0)
    assert cli.main(["demo"]) == 0
    time.sleep(1.1)
    assert cli.main(["demo"]) == 0
    assert len(set(outs)) == 2 and all(o.startswith(os.path.join("runs", "demo-")) for o in outs)


def test_a_resume_rewrites_only_its_own_tensorboard_segment(tmp_path, monkeypatch):
    """Segments before the checkpoint's keep their files; the checkpoint's segment is rewritten from
    metrics.jsonl, later steps (logged after the checkpoint) are gone: one point per step."""
    from ppo_fast.ppo import run_folder

    monkeypatch.setattr(run_folder, "SEGMENT_STEPS", 4)
    out = str(tmp_path / "run")
    with RunFolder(out).open(quiet(tmp_path), resume=False) as run:
        run.begin(0)
        for step in range(1, 15):
            run.log({"step": step, "reward_mean": step / 10})
    files = sorted(os.listdir(out))
    assert len([f for f in files if f.startswith("events.out")]) == 4  # steps 1-4, 5-8, 9-12, 13-14
    before = {f: os.stat(os.path.join(out, f)).st_mtime_ns for f in files if f.startswith("events.out")}
    with RunFolder(out).open(quiet(tmp_path), resume=True) as run:
        run.begin(10)  # resumed from a checkpoint at step 10: steps 11-14 are dropped
        run.log({"step": 11, "reward_mean": 9.0})
    after = {f: os.stat(os.path.join(out, f)).st_mtime_ns for f in os.listdir(out) if f.startswith("events.out")}
    kept = {f for f in before if after.get(f) == before[f]}
    assert sorted(int(f[-7:]) for f in kept) == [0, 1]  # the segments of steps 1-8, untouched
    assert tensorboard_steps(out) == list(range(1, 12))
    assert [m["step"] for m in RunFolder(out).read_metrics()] == list(range(1, 12))
    assert [m["reward_mean"] for m in RunFolder(out).read_metrics()][-2:] == [1.0, 9.0]


def test_resume_cost_does_not_grow_with_the_history(tmp_path, monkeypatch):
    """After a 100,000-step history, a resume reads and rewrites at most two segments of it."""
    from ppo_fast.ppo import run_folder

    out = tmp_path / "run"
    out.mkdir()
    steps = 100_000
    row = ', "reward_mean": 0.5, "kl": 0.01, "entropy": 1.5, "clipfrac": 0.1, "policy_loss": -0.01}\n'
    (out / "metrics.jsonl").write_text("".join('{"step": %d%s' % (s, row) for s in range(1, steps + 1)))
    for segment in range(run_folder.segment_of(steps)):  # the earlier segments' event files, as a run leaves them
        (out / f"events.out.tfevents.0.host.1.{segment}.seg{segment:07d}").write_bytes(b"")
    parsed, scalars = [], []
    real_parse = run_folder._parse_line
    monkeypatch.setattr(run_folder, "_parse_line", lambda line: parsed.append(1) or real_parse(line))
    from torch.utils.tensorboard import SummaryWriter

    monkeypatch.setattr(SummaryWriter, "add_scalar", lambda self, *args, **kw: scalars.append(args))
    with RunFolder(str(out)).open(quiet(tmp_path), resume=True) as run:
        run.begin(steps)
    assert len(parsed) <= 2 * run_folder.SEGMENT_STEPS + 2
    assert len(scalars) == run_folder.SEGMENT_STEPS * 5  # the last segment, rewritten; nothing else
    assert len(os.listdir(out)) >= run_folder.segment_of(steps)


def test_resume_with_an_unknown_override_names_it_even_without_a_config(tmp_path, capsys):
    out = str(tmp_path / "never-ran")
    assert cli.main(["train", "--out", out, "--resume", "lr_typo=1e-5"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key(s) ['lr_typo']" in err and "config.yaml" not in err


def test_a_fresh_run_saves_its_config_and_checks_for_old_checkpoints_once(tmp_path, monkeypatch):
    from ppo_fast.ppo import checkpoint, config, run_folder

    saves, refusals = [], []
    real_save, real_refuse = config.ConfigFile.save, run_folder.refuse_earlier_run
    monkeypatch.setattr(config.ConfigFile, "save", lambda self, path: saves.append(path) or real_save(self, path))
    monkeypatch.setattr(run_folder, "refuse_earlier_run", lambda out: refusals.append(out) or real_refuse(out))
    out = str(tmp_path / "run")
    assert cli.main(["train", "--out", out, "--steps", "1", "progress=false", "rollout_batch_size=8",
                     "mini_batch_size=8", "micro_batch_size=4"]) == 0
    assert len(saves) == 1 and len(refusals) == 1
    assert checkpoint.list_checkpoints(out)
