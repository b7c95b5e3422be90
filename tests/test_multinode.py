"""Training on several machines: scripts/train/*.sh with NNODES > 1 (common.sh; README, "Several processes").

* the command each machine runs, recorded by a stand-in torchrun: torchrun's static rendezvous
  (--nnodes, --node-rank, --master-addr, --master-port), --distributed-world-size NNODES*NGPU and the
  effective batch counted over all NNODES*NGPU processes;
* a missing NODE_RANK or MASTER_ADDR is a one-line error, not a rendezvous that waits for the other side;
* a real two-machine run on this one: the script started twice, NODE_RANK 0 and 1, each running
  torchrun --nnodes 2 --nproc-per-node 1 (one CPU process on gloo), meeting at 127.0.0.1 on a free port.
  Both must finish, fairseq must train on 2 devices with rank 0 on machine 0 and rank 1 on machine 1, and
  only rank 0 writes a checkpoint (made with world size 2). That the two ranks hold the same model is
  fairseq's own check: after every update it compares the gradient norms of all ranks and stops with
  "gradients are inconsistent between workers" when they differ.
"""
import math
import os
import signal
import socket
import subprocess
import time

import pytest
import torch

from test_train_scripts import SCRIPTS, check_ok, fake_run, option, run_script, script_env  # noqa: F401 (fixture)

pytestmark = pytest.mark.timeout(300)

MULTI_NODE_VARS = ("NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def no_multi_node_environment(monkeypatch):
    """The scripts read these from the environment: each test sets its own."""
    for name in MULTI_NODE_VARS:
        monkeypatch.delenv(name, raising=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- the command, with a stand-in torchrun ------------------------------------------------------


def test_two_machines_run_torchrun_with_a_static_rendezvous(fake_run):
    argv = fake_run("snli_ve.sh", NNODES=2, NODE_RANK=1, MASTER_ADDR="10.0.0.1", MASTER_PORT=29400, NGPU=4)
    assert argv[:11] == ["fake-torchrun", "--nnodes", "2", "--node-rank", "1", "--master-addr", "10.0.0.1",
                         "--master-port", "29400", "--nproc-per-node", "4"]
    assert argv[11].endswith("fake-train") and "--standalone" not in argv
    assert option(argv, "--distributed-world-size") == "8"
    assert int(option(argv, "--batch-size")) * int(option(argv, "--update-freq")) * 8 == 64
    assert int(option(argv, "--total-num-update")) == 5 * math.ceil(1000 / 64)  # 8 x 8 sentences a step


def test_one_process_per_machine_still_uses_torchrun(fake_run):
    argv = fake_run("caption_stage1.sh", NNODES=2, NODE_RANK=0, MASTER_ADDR="node0.example")
    assert argv[0] == "fake-torchrun" and option(argv, "--nproc-per-node") == "1"
    assert option(argv, "--master-port") == "29500"  # torchrun's default port
    assert option(argv, "--distributed-world-size") == "2"
    assert int(option(argv, "--batch-size")) * int(option(argv, "--update-freq")) * 2 == 64  # update-freq 4
    assert option(argv, "--update-freq") == "4"


def test_synthetic_effective_batch_counts_every_machine(fake_run):
    argv = fake_run.synthetic("snli_ve.sh", NNODES=3, NODE_RANK=2, MASTER_ADDR="h", NGPU=2, BATCH_SIZE=4)
    assert option(argv, "--distributed-world-size") == "6" and option(argv, "--update-freq") == "1"
    assert "--cpu" in argv and option(argv, "--distributed-backend") == "gloo"


@pytest.mark.parametrize("env,message", [
    ({"NNODES": 2, "MASTER_ADDR": "h"}, "NNODES=2 needs NODE_RANK, this machine's number from 0 to 1, got ''"),
    ({"NNODES": 2, "NODE_RANK": 2, "MASTER_ADDR": "h"},
     "NNODES=2 needs NODE_RANK, this machine's number from 0 to 1, got '2'"),
    ({"NNODES": 2, "NODE_RANK": 0}, "NNODES=2 needs MASTER_ADDR, the address of the machine with NODE_RANK=0"),
    ({"NNODES": 2, "NODE_RANK": 0, "MASTER_ADDR": "h", "MASTER_PORT": "http"},
     "MASTER_PORT must be a port number, got 'http'"),
    ({"NNODES": "two"}, "NNODES must be a positive integer, got 'two'"),
    ({"NNODES": 2, "NODE_RANK": 0, "MASTER_ADDR": "h", "EFFECTIVE_BATCH": 40},
     "EFFECTIVE_BATCH=40 is not a multiple of BATCH_SIZE*NNODES*NGPU=8*2*1"),
])
def test_multi_node_mistakes_are_one_line_errors(tmp_path, env, message):
    ckpt = tmp_path / "ofa.pt"
    ckpt.write_bytes(b"x")
    (tmp_path / "train.tsv").write_text("row\n" * 10)
    result = run_script("snli_ve.sh", tmp_path, ckpt, tmp_path / "save", TORCHRUN="false", FAIRSEQ_TRAIN="false",
                        **env)
    assert result.returncode == 2 and result.stderr == f"snli_ve.sh: {message}\n"


# ---- two machines on localhost ------------------------------------------------------------------


def test_two_nodes_train_together_on_localhost(tmp_path):
    from mue.data.synthetic import generate

    generate(str(tmp_path / "data"), num_train=2, num_valid=1, num_test=1, image_size=64)  # 6 training rows
    port = free_port()
    procs, logs = [], []
    for rank in range(2):
        log = open(tmp_path / f"node{rank}.log", "w")
        logs.append(log)
        env = script_env(NNODES=2, NODE_RANK=rank, MASTER_ADDR="127.0.0.1", MASTER_PORT=port, EPOCHS=1, BATCH_SIZE=2)
        cmd = ["bash", str(SCRIPTS / "snli_ve.sh"), "--synthetic", str(tmp_path / "data"),
               str(tmp_path / f"save{rank}"), "--max-update", "2"]
        # own process group: torchrun and its worker are killed together if the run does not end
        procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
    deadline = time.monotonic() + 150
    try:
        codes = [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        for log in logs:
            log.close()
    text = [(tmp_path / f"node{rank}.log").read_text() for rank in range(2)]
    for rank in range(2):
        assert codes[rank] == 0, f"machine {rank} failed:\n{text[rank][-4000:]}"
        assert (f"torchrun --nnodes 2 --node-rank {rank} --master-addr 127.0.0.1 --master-port {port} "
                "--nproc-per-node 1 ") in text[rank]
        assert "6 training rows, batch 2 x 2 process(es) x update-freq 1" in text[rank]
        assert f"as rank {rank}\n" in text[rank]  # fairseq: "initialized host ... as rank R"
    assert "training on 2 devices" in text[0]
    assert list((tmp_path / "save1").glob("*.pt")) == []  # only rank 0 saves
    state = torch.load(tmp_path / "save0" / "checkpoint_last.pt", map_location="cpu")
    assert state["optimizer_history"][-1]["num_updates"] == 2
    assert state["cfg"]["distributed_training"]["distributed_world_size"] == 2
    assert state["cfg"]["optimization"]["update_freq"] == [1] and state["cfg"]["dataset"]["batch_size"] == 2
