"""Distributed training on the CPU: two fairseq-train processes on gloo, started by hand.

Each rank runs `fairseq-train --distributed-no-spawn --distributed-rank R --distributed-world-size 2
--distributed-backend gloo --cpu --ddp-backend pytorch_ddp` (pytorch_ddp on the CPU needs mue.compat's
`cpu_safe_ddp`). A test-only plugin (written to a temporary folder, see PROBE) registers the task
`mue_snli_ve_probe`: mue's SNLI-VE task that records, per rank, the sample ids of every training step and a
hash of the parameters before training and after the last update. Checked: the ranks see disjoint shards
that together cover the epoch, the gradients are synchronised (bit-identical parameters on both ranks
although they saw different data), training changed the parameters, and only rank 0 writes a checkpoint,
holding those parameters.
"""
import hashlib
import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

import mue  # noqa: F401  (compat: fairseq checkpoints load weights-only)

pytestmark = pytest.mark.timeout(240)

PROBE = textwrap.dedent('''
    """Test-only fairseq plugin: mue plus the task mue_snli_ve_probe (see tests/test_distributed.py)."""
    import hashlib
    import json
    import os

    import torch
    import torch.distributed as dist
    from fairseq.tasks import register_task

    import mue  # noqa: F401  (registers mue's model, tasks, criteria)
    from mue.tasks.snli_ve import SnliVeConfig, SnliVeTask


    def params_hash(model):
        h = hashlib.sha256()
        for name, p in model.named_parameters():
            h.update(name.encode())
            h.update(p.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()


    @register_task("mue_snli_ve_probe", dataclass=SnliVeConfig)
    class ProbeTask(SnliVeTask):
        def _record(self, **entry):
            rank = dist.get_rank() if dist.is_initialized() else 0
            entry["rank"] = rank
            with open(os.path.join(os.environ["MUE_PROBE_DIR"], f"rank{rank}.jsonl"), "a") as f:
                f.write(json.dumps(entry) + "\\n")

        def begin_epoch(self, epoch, model):
            super().begin_epoch(epoch, model)
            self._record(event="begin_epoch", epoch=epoch, params=params_hash(model))

        def train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad=False):
            self._record(event="train_step", update=update_num, ids=sample["id"].tolist(), ignore_grad=ignore_grad)
            return super().train_step(sample, model, criterion, optimizer, update_num, ignore_grad)

        def begin_valid_epoch(self, epoch, model):
            super().begin_valid_epoch(epoch, model)
            self._record(event="valid", epoch=epoch, params=params_hash(model),
                         names=[name for name, _ in model.named_parameters()])
''')

# micro arch shrunk further: the test is about the distributed machinery, not the model
TINY = ["--arch", "mue_ofa_micro", "--encoder-embed-dim", "32", "--decoder-embed-dim", "32",
        "--encoder-ffn-embed-dim", "64", "--decoder-ffn-embed-dim", "64", "--encoder-layers", "2",
        "--decoder-layers", "2", "--encoder-attention-heads", "2", "--decoder-attention-heads", "2",
        "--patch-image-size", "32", "--num-codes", "0", "--num-bins", "0"]
TRAIN_ROWS = 12  # 4 synthetic images x 3 hypotheses
BATCH = 2  # per rank: 12 rows = 6 batches = 3 updates on 2 ranks


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def params_hash(named_tensors) -> str:
    """Same hash as the probe's, from (name, tensor) pairs."""
    h = hashlib.sha256()
    for name, p in named_tensors:
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def read_probe(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Train 3 updates on 2 ranks; returns (tmp dir, probe records per rank, save dir per rank)."""
    from mue.data.synthetic import generate

    root = tmp_path_factory.mktemp("ddp")
    generate(str(root / "data"), num_train=4, num_valid=1, num_test=1, image_size=32)
    plugin = root / "plugin" / "mue_probe"
    plugin.mkdir(parents=True)
    (plugin / "__init__.py").write_text(PROBE)
    probe_dir = root / "probe"
    probe_dir.mkdir()
    train = os.path.join(os.path.dirname(sys.executable), "fairseq-train")
    port = free_port()
    env = dict(os.environ, MUE_PROBE_DIR=str(probe_dir), OMP_NUM_THREADS="1")
    procs, logs, save_dirs = [], [], []
    for rank in range(2):
        save_dirs.append(root / f"save{rank}")  # one per rank: only rank 0 may write into its own
        cmd = [train, str(root / "data" / "snli_ve"), "--user-dir", str(plugin), "--task", "mue_snli_ve_probe",
               *TINY, "--criterion", "mue", "--optimizer", "adam", "--lr", "1e-3", "--batch-size", str(BATCH),
               "--required-batch-size-multiple", "1", "--max-update", "3", "--num-workers", "0", "--seed", "7",
               "--save-dir", str(save_dirs[rank]), "--no-epoch-checkpoints", "--no-progress-bar",
               "--cpu", "--distributed-world-size", "2", "--distributed-rank", str(rank),
               "--distributed-no-spawn", "--distributed-backend", "gloo", "--ddp-backend", "pytorch_ddp",
               "--find-unused-parameters",  # the decoder's image-position and image-code parts get no gradient
               "--distributed-init-method", f"tcp://127.0.0.1:{port}"]
        log = open(root / f"rank{rank}.log", "w")
        logs.append(log)
        procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env))
    try:
        codes = [p.wait(timeout=180) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for log in logs:
            log.close()
    for rank, code in enumerate(codes):
        assert code == 0, f"rank {rank} failed:\n" + (root / f"rank{rank}.log").read_text()[-4000:]
    records = {rank: read_probe(probe_dir / f"rank{rank}.jsonl") for rank in range(2)}
    return root, records, save_dirs


def steps(records):
    return [r for r in records if r["event"] == "train_step"]


def test_ranks_train_on_disjoint_shards_covering_the_epoch(run):
    _, records, _ = run
    per_rank = {rank: steps(recs) for rank, recs in records.items()}
    for rank, rank_steps in per_rank.items():
        assert [s["update"] for s in rank_steps] == [0, 1, 2], f"rank {rank} did not run 3 updates"
        assert not any(s["ignore_grad"] for s in rank_steps), "a rank trained on a dummy batch"
        assert all(len(s["ids"]) == BATCH for s in rank_steps)
    for u in range(3):
        ids0, ids1 = set(per_rank[0][u]["ids"]), set(per_rank[1][u]["ids"])
        assert not ids0 & ids1, f"update {u}: both ranks trained on {sorted(ids0 & ids1)}"
    seen = sorted(i for rank_steps in per_rank.values() for s in rank_steps for i in s["ids"])
    assert seen == list(range(TRAIN_ROWS)), "the two shards do not cover the epoch exactly once"


def test_parameters_are_synchronised_and_changed(run):
    _, records, _ = run
    start = {rank: next(r["params"] for r in recs if r["event"] == "begin_epoch") for rank, recs in records.items()}
    end = {rank: [r["params"] for r in recs if r["event"] == "valid"][-1] for rank, recs in records.items()}
    assert start[0] == start[1], "the ranks started from different parameters"
    assert end[0] == end[1], "parameters differ between ranks after training: gradients were not synchronised"
    assert end[0] != start[0], "training did not change the parameters"


def test_only_rank_zero_writes_one_checkpoint(run):
    _, records, save_dirs = run
    written = sorted(p.name for p in save_dirs[0].glob("*.pt"))
    assert written == ["checkpoint_best.pt", "checkpoint_last.pt"]
    assert not list(save_dirs[1].glob("*.pt")), "rank 1 wrote a checkpoint"
    state = torch.load(save_dirs[0] / "checkpoint_last.pt", map_location="cpu")
    assert state["optimizer_history"][-1]["num_updates"] == 3
    assert state["cfg"]["distributed_training"]["distributed_world_size"] == 2
    final = [r for r in records[0] if r["event"] == "valid"][-1]
    model = state["model"]  # also holds buffers and tied weights under several names: hash the probe's names
    assert params_hash((n, model[n]) for n in final["names"]) == final["params"], \
        "the checkpoint does not hold the trained parameters"
