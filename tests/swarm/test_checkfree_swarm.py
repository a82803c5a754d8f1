"""CheckFree over real processes: every peer of a block stage is SIGKILLed mid-run, a
standby peer notices, rebuilds the stage from its neighbours (no checkpoint anywhere) and
the pipeline trains on within seconds."""

import json
import re
import signal
import time

import pytest
from conftest import peer_processes, spawn_peer, swarm_view, wait_for

pytestmark = pytest.mark.slow  # starts peer processes; run by the default command

STAGE = ["--role", "stage", "--stages", "4", "--microbatch-size", "2"]


def own_entry(url: str, peer_id: str):
    view = swarm_view(url)
    return next((p for p in view["peers"] if p["peer_id"] == peer_id), None) if view else None


@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    "lost, driver_flags, how",
    [
        (2, [], "CheckFree, from stages 1 and 3"),
        (3, ["--out-of-order", "0.5"], "CheckFree+, from stage 2"),
    ],
)
def test_a_lost_stage_is_rebuilt_by_a_standby_and_training_resumes_within_5_s(
    corpus, tmp_path, lost, driver_flags, how
):
    rounds, inner_steps = 4, 15
    flags = (
        [[*STAGE, "--stage", "0", *driver_flags]]
        + [[*STAGE, "--stage", str(k)] for k in (1, 2, 3)]
        + [[*STAGE, "--standby"]]
    )
    with peer_processes(corpus, tmp_path, rounds, inner_steps, flags, model="tiny-deep") as (
        procs,
        urls,
    ):
        wait_for(
            lambda: (
                (v := swarm_view(urls[0]))
                and len(v["peers"]) == 5
                and max(p["round"] for p in v["peers"]) >= 1
            ),
            120,
            "round 1",
        )
        wait_for(
            lambda: (e := own_entry(urls[0], "peer-0")) and e["step"] >= inner_steps + 3,
            30,
            "round 2 under way",
        )
        victim = procs[lost]
        victim.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        victim.wait(timeout=10)
        # the standby takes the stage, and a step of the driver's runs through it
        wait_for(
            lambda: (e := own_entry(urls[4], "peer-4")) and e["stage"] == lost and e["step"] > 0,
            30,
            "a step through the rebuilt stage",
        )
        resumed_s = time.monotonic() - killed_at
        print(f"stage {lost} ({how}): training resumed {resumed_s:.2f} s after the SIGKILL")
        for i in (0, 1, 2, 3, 4):
            if i != lost:
                assert procs[i].wait(timeout=150) == 0, (tmp_path / f"peer-{i}.log").read_text()[
                    -3000:
                ]
        log = (tmp_path / "peer-4.log").read_text()
        assert f"stage {lost} had no live peer: rebuilt it from stage" in log, log[-3000:]
        assert ("CheckFree+" in log) == (lost == 3)
        driver = json.loads((tmp_path / "peer-0.json").read_text())
        assert [r["round"] for r in driver["rounds"]] == list(range(1, rounds + 1))
        assert driver["inner_steps_total"] == rounds * inner_steps
        losses = [r["eval_loss"] for r in driver["rounds"]]
        assert losses[-1] < losses[0], losses  # round 1 was before the loss
        assert resumed_s < 5.0, resumed_s


@pytest.mark.timeout(240)
def test_a_peer_joining_a_stage_whose_holder_died_rebuilds_it_from_the_neighbours(corpus, tmp_path):
    """No standby: stage 2's only peer is SIGKILLed and a new `--stage 2` peer joins. If
    the dead one still looks alive in the table, its state download from it fails and it
    declares it dead; either way it rebuilds the stage (CheckFree) and the run finishes.
    (SWIM's probes usually hold the dead peer dead before the joiner has started.)"""
    rounds, inner_steps = 4, 15
    flags = [[*STAGE, "--stage", str(k)] for k in range(4)]
    with peer_processes(corpus, tmp_path, rounds, inner_steps, flags, model="tiny-deep") as (
        procs,
        urls,
    ):
        wait_for(
            lambda: (e := own_entry(urls[0], "peer-0")) and e["step"] >= inner_steps + 3,
            120,
            "round 2 under way",
        )
        procs[2].send_signal(signal.SIGKILL)
        procs[2].wait(timeout=10)
        procs.append(
            spawn_peer(
                corpus,
                tmp_path,
                4,
                rounds,
                inner_steps,
                [*STAGE, "--stage", "2"],
                "tiny-deep",
                urls[0],
            )
        )
        for i in (0, 1, 3, 4):
            assert procs[i].wait(timeout=180) == 0, (tmp_path / f"peer-{i}.log").read_text()[-3000:]
        log = (tmp_path / "peer-4.log").read_text()
        assert "stage 2 had no live peer: rebuilt it from stages 1 and 3" in log, log[-3000:]
        driver = json.loads((tmp_path / "peer-0.json").read_text())
        assert [r["round"] for r in driver["rounds"]] == list(range(1, rounds + 1))
        assert driver["inner_steps_total"] == rounds * inner_steps


@pytest.mark.timeout(240)
def test_a_lost_stage_0_is_copied_from_stage_1_and_a_standby_drives_on(corpus, tmp_path):
    """CheckFree+ for the embedding: the driver (stage 0's only peer) is SIGKILLed in round
    2; the standby takes stage 0 with the copy of its weights that stage 1 keeps, becomes
    the replica's driver, and the stage peers finish the run with it."""
    rounds, inner_steps = 4, 15
    flags = [[*STAGE, "--stage", str(k)] for k in range(4)] + [[*STAGE, "--standby"]]
    with peer_processes(corpus, tmp_path, rounds, inner_steps, flags, model="tiny-deep") as (
        procs,
        urls,
    ):
        wait_for(
            lambda: (
                (e := own_entry(urls[0], "peer-0"))
                and e["round"] >= 1
                and e["step"] >= inner_steps + 3
            ),
            120,
            "round 2 under way",
        )
        wait_for(
            lambda: "keeping a copy of stage 0's weights" in (tmp_path / "peer-1.log").read_text(),
            30,
            "stage 1's copy of stage 0",
        )
        procs[0].send_signal(signal.SIGKILL)
        procs[0].wait(timeout=10)
        for i in (1, 2, 3, 4):
            assert procs[i].wait(timeout=180) == 0, (tmp_path / f"peer-{i}.log").read_text()[-3000:]
        log = (tmp_path / "peer-4.log").read_text()
        copied = re.search(
            r"stage 0 had no live peer: copied it from stage 1's replica of it \(CheckFree\+, "
            r"its weights of round (\d+)\)",
            log,
        )
        assert copied, log[-3000:]
        # the copy carried the dead driver's training: evaluated right after the takeover, the
        # loss is about where the dead driver's was with the weights of the copy's round
        # (the block stages may be a round further), far below the initial weights' ~5.5
        copy_round = int(copied.group(1))
        dead_driver_evals = dict(
            re.findall(r"round (\d+) done: eval ([\d.]+)", (tmp_path / "peer-0.log").read_text())
        )
        at_copy = float(dead_driver_evals[str(copy_round - 1)])
        new_driver = json.loads((tmp_path / "peer-4.json").read_text())
        assert new_driver["initial_eval_loss"] < at_copy + 0.3 < 4.5, (
            new_driver["initial_eval_loss"],
            copy_round,
            dead_driver_evals,
        )
        assert [r["round"] for r in new_driver["rounds"]][-1] == rounds
        for i in (1, 2, 3):
            stage = json.loads((tmp_path / f"peer-{i}.json").read_text())
            assert [r["round"] for r in stage["rounds"]] == list(range(1, rounds + 1))
            assert "peer-4" in stage["rounds"][-1]["applied"]
