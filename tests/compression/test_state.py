"""The calibrate loop's resumable state: periodic saves, Ctrl-C held to a step boundary, config checks."""
from __future__ import annotations

import os
import signal

import pytest

from blocktrain.trainer.compression.state import ResumableState
from blocktrain.trainer.context import RunContext
from blocktrain.trainer.errors import UserError


def test_periodic_saves_keep_the_last_finished_step_after_a_crash(tmp_path):
    run = RunContext(cfg=None, run_dir=tmp_path, metrics=None)
    state = ResumableState(run, "demo", {"density": 0.5}, save_every_s=0.0)
    done = []
    with pytest.raises(RuntimeError):
        with state.steps(10, "demo", lambda: {"done": len(done)}) as step_done:
            for i in range(10):
                if i == 3:
                    raise RuntimeError("crash in the middle of step 4")
                done.append(i)
                step_done()
    assert run.load_state("demo") == {"config": {"density": 0.5}, "payload": {"done": 3}}


def test_ctrl_c_is_held_until_the_step_ends_and_twice_stops_at_once(tmp_path):
    run = RunContext(cfg=None, run_dir=tmp_path, metrics=None)
    state = ResumableState(run, "demo", {}, save_every_s=1e9)
    done = []
    with pytest.raises(KeyboardInterrupt):
        with state.steps(10, "demo", lambda: {"done": len(done)}) as step_done:
            for i in range(10):
                if i == 2:
                    os.kill(os.getpid(), signal.SIGINT)  # in the middle of step 3: the step still completes
                done.append(i)
                step_done()
    assert done == [0, 1, 2] and run.load_state("demo")["payload"] == {"done": 3}
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

    again = ResumableState(run, "demo", {}, save_every_s=1e9)
    with pytest.raises(KeyboardInterrupt):
        with again.steps(10, "demo", lambda: {"done": -1}) as step_done:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)  # the second one raises here, before the step ends
            step_done()
    assert run.load_state("demo")["payload"] == {"done": 3}


def test_resume_loads_only_when_resuming_and_checks_the_config(tmp_path):
    fresh = RunContext(cfg=None, run_dir=tmp_path, metrics=None)
    ResumableState(fresh, "demo", {"density": 0.5, "epochs": 1}, 0.0, free=("epochs",)).save({"step": 7})
    assert ResumableState(fresh, "demo", {"density": 0.5}, 0.0).load() is None
    resuming = RunContext(cfg=None, run_dir=tmp_path, metrics=None, resuming=True)
    assert ResumableState(resuming, "demo", {"density": 0.5, "epochs": 3}, 0.0, free=("epochs",)).load() == {"step": 7}
    with pytest.raises(UserError, match=r"plugin.demo.density=0.5, this run has 0.3"):
        ResumableState(resuming, "demo", {"density": 0.3, "epochs": 1}, 0.0, free=("epochs",)).load()
    assert ResumableState(resuming, "other", {}, 0.0).load() is None
