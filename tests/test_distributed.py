"""Distributed training on the CPU: two fairseq-train processes on gloo, started by hand.

Each rank runs `fairseq-train --distributed-no-spawn --distributed-rank R --distributed-world-size 2
--distributed-backend gloo --cpu --ddp-backend pytorch_ddp` (pytorch_ddp on the CPU needs mue.compat's
`cpu_safe_ddp`). A test-only plugin (written to a temporary folder, see PROBE) registers the task
`mue_snli_ve_probe`: mue's SNLI-VE task that records, per rank, the sample ids of every training step and a
hash of the parameters (and of the BatchNorm running statistics) before training and at validation.

The first run (`run`) trains from scratch without --find-unused-parameters (the model's unused
image-generation parameters do not ask for gradients). Checked: the ranks see disjoint shards that together
cover the epoch, the gradients are synchronised (bit-identical parameters on both ranks although they saw
different data), so are the BatchNorm running statistics, training changed the parameters, and only rank 0
writes a checkpoint, holding those parameters.

Then checkpoints are loaded with two processes (rank 0 reads the file and broadcasts it: mue.compat's
allow-list must accept fairseq's `_TensorPlaceholder`): a resume of that run, and a `--finetune-from-model`
run (with --find-unused-parameters, which keeps working). Each ends with parameters and Adam moments
bit-identical to the same training in one process with --update-freq 2 (in this process): with dropout off
(the ranks would draw other dropout masks than one process does for its second batch), both see the
same batches in the same updates, and DDP's mean of the two ranks' gradients times fairseq's factor
world_size / sample_size equals the accumulated sum times 1 / sample_size exactly (scaling by 2 is exact in
floating point). The BatchNorm running statistics legitimately differ between the two (one process updates
them batch after batch; two processes average theirs) and are not compared.
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

pytestmark = pytest.mark.timeout(300)

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


    def params_hash(model_or_pairs):
        h = hashlib.sha256()
        pairs = model_or_pairs.named_parameters() if hasattr(model_or_pairs, "named_parameters") else model_or_pairs
        for name, p in pairs:
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
                         names=[name for name, _ in model.named_parameters()],
                         bn_stats=params_hash((n, b) for n, b in model.named_buffers() if ".running_" in n))
''')

# micro arch shrunk further: the test is about the distributed machinery, not the model; dropout off, so that
# one process with --update-freq 2 can match two processes bit for bit
TINY = ["--arch", "mue_ofa_micro", "--encoder-embed-dim", "32", "--decoder-embed-dim", "32",
        "--encoder-ffn-embed-dim", "64", "--decoder-ffn-embed-dim", "64", "--encoder-layers", "2",
        "--decoder-layers", "2", "--encoder-attention-heads", "2", "--decoder-attention-heads", "2",
        "--patch-image-size", "32", "--num-codes", "0", "--num-bins", "0", "--dropout", "0"]
TRAIN_ROWS = 12  # 4 synthetic images x 3 hypotheses
BATCH = 2  # per rank: 12 rows = 6 batches = 3 updates on 2 ranks
COMMON = [*TINY, "--criterion", "mue", "--optimizer", "adam", "--lr", "1e-3", "--batch-size", str(BATCH),
          "--required-batch-size-multiple", "1", "--num-workers", "0", "--seed", "7", "--no-epoch-checkpoints",
          "--no-progress-bar", "--cpu"]
TRAIN = os.path.join(os.path.dirname(sys.executable), "fairseq-train")


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


def train_two_ranks(root, name, save_dirs, args):
    """fairseq-train COMMON + args on ranks 0 and 1 (save_dirs[rank]); returns the probe records per rank."""
    probe_dir = root / f"probe_{name}"
    probe_dir.mkdir()
    port = free_port()
    env = dict(os.environ, MUE_PROBE_DIR=str(probe_dir), OMP_NUM_THREADS="1")
    procs, logs = [], []
    for rank in range(2):
        cmd = [TRAIN, str(root / "data" / "snli_ve"), "--user-dir", str(root / "plugin" / "mue_probe"),
               "--task", "mue_snli_ve_probe", *COMMON, *args, "--save-dir", str(save_dirs[rank]),
               "--distributed-world-size", "2", "--distributed-rank", str(rank), "--distributed-no-spawn",
               "--distributed-backend", "gloo", "--ddp-backend", "pytorch_ddp",
               "--distributed-init-method", f"tcp://127.0.0.1:{port}"]
        log = open(root / f"{name}_rank{rank}.log", "w")
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
        assert code == 0, f"{name}: rank {rank} failed:\n" + (root / f"{name}_rank{rank}.log").read_text()[-4000:]
    return {rank: read_probe(probe_dir / f"rank{rank}.jsonl") for rank in range(2)}


def train_one_process(root, save_dir, args):
    """The same training in this process (task mue_snli_ve, one intra-op thread like the ranks); returns
    the checkpoint it ends with."""
    from fairseq import options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq_cli import train as fairseq_train

    argv = [str(root / "data" / "snli_ve"), "--task", "mue_snli_ve", *COMMON, *args, "--save-dir", str(save_dir)]
    cfg = convert_namespace_to_omegaconf(options.parse_args_and_arch(options.get_training_parser(), argv))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fairseq_train.main(cfg)
    finally:
        torch.set_num_threads(threads)
    return torch.load(save_dir / "checkpoint_last.pt", map_location="cpu")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """Synthetic SNLI-VE data and the probe plugin."""
    from mue.data.synthetic import generate

    root = tmp_path_factory.mktemp("ddp")
    generate(str(root / "data"), num_train=4, num_valid=1, num_test=1, image_size=32)
    plugin = root / "plugin" / "mue_probe"
    plugin.mkdir(parents=True)
    (plugin / "__init__.py").write_text(PROBE)
    return root


@pytest.fixture(scope="module")
def run(root):
    """Train 3 updates on 2 ranks, without --find-unused-parameters; returns (tmp dir, probe records per rank,
    save dir per rank: one each, so that only rank 0 may write into its own)."""
    save_dirs = [root / "save0", root / "save1"]
    records = train_two_ranks(root, "fresh", save_dirs, ["--max-update", "3"])
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


def test_ddp_trains_without_find_unused_parameters(run):
    """The run above used plain DDP: the unused image-generation parameters ask for no gradient."""
    root, records, save_dirs = run
    assert "'find_unused_parameters': False" in (root / "fresh_rank0.log").read_text()
    assert all(steps(recs) for recs in records.values())
    state = torch.load(save_dirs[0] / "checkpoint_last.pt", map_location="cpu")
    from mue.models.mue_ofa import UNUSED_PARAMETERS

    unused = [k for k in state["model"] if k.startswith(UNUSED_PARAMETERS)]
    assert unused, "the checkpoint lacks the unused parameters (they must stay, for strict loading)"


def test_batchnorm_statistics_are_the_same_on_both_ranks(run):
    """Each rank normalises with its own batches; the running statistics are averaged over the ranks, so both
    ranks and the checkpoint hold the same ones."""
    _, records, save_dirs = run
    final = {rank: [r for r in recs if r["event"] == "valid"][-1] for rank, recs in records.items()}
    assert final[0]["bn_stats"] == final[1]["bn_stats"], "BatchNorm running statistics differ between ranks"
    model = torch.load(save_dirs[0] / "checkpoint_last.pt", map_location="cpu")["model"]
    saved = params_hash((n, b) for n, b in model.items() if ".running_" in n)
    assert saved == final[0]["bn_stats"]


def is_trained_state(key: str) -> bool:
    """Parameters, not the BatchNorm running statistics (see the module docstring)."""
    return not key.endswith((".running_mean", ".running_var", ".num_batches_tracked"))


def assert_same_training_state(two: dict, one: dict, what: str):
    """Bit-identical parameters and Adam moments in two checkpoints."""
    assert two["optimizer_history"][-1]["num_updates"] == one["optimizer_history"][-1]["num_updates"]
    keys = [k for k in one["model"] if is_trained_state(k)]
    assert keys and two["model"].keys() == one["model"].keys()
    for key in keys:
        a, b = two["model"][key], one["model"][key]
        assert torch.equal(a, b), f"{what}: {key} differs (max |diff| {(a.double() - b.double()).abs().max():.3g})"
    adam2, adam1 = two["last_optimizer_state"]["state"], one["last_optimizer_state"]["state"]
    assert adam2.keys() == adam1.keys() and adam1
    for index in adam1:
        for moment in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(adam2[index][moment], adam1[index][moment]), f"{what}: Adam {moment} of param {index}"


@pytest.fixture(scope="module")
def one_process(root):
    """The fresh run, to 5 updates, in one process with --update-freq 2."""
    return train_one_process(root, root / "one", ["--max-update", "5", "--update-freq", "2"])


def test_two_process_resume_equals_one_process_update_freq_2(run, one_process):
    root, _, save_dirs = run
    # rank 1 looks for the checkpoint too (fairseq checks the file on every rank): both share rank 0's folder
    records = train_two_ranks(root, "resume", [save_dirs[0], save_dirs[0]], ["--max-update", "5"])
    for rank, recs in records.items():
        assert [s["update"] for s in steps(recs)] == [3, 4], f"rank {rank} did not continue at update 3"
    resumed = torch.load(save_dirs[0] / "checkpoint_last.pt", map_location="cpu")
    assert_same_training_state(resumed, one_process, "2 processes 3 + 2 updates vs 1 process --update-freq 2")


def test_two_process_finetune_equals_one_process_update_freq_2(root, one_process):
    source = root / "one" / "checkpoint_last.pt"
    args = ["--finetune-from-model", str(source), "--max-update", "2"]
    records = train_two_ranks(root, "finetune", [root / "ft2"] * 2, [*args, "--find-unused-parameters"])
    start = params_hash((n, one_process["model"][n]) for n in [r for r in records[0] if r["event"] == "valid"][-1]["names"])
    for rank, recs in records.items():
        assert [s["update"] for s in steps(recs)] == [0, 1]
        first = next(r["params"] for r in recs if r["event"] == "begin_epoch")
        assert first == start, f"rank {rank} did not start from the fine-tuned checkpoint"
    two = torch.load(root / "ft2" / "checkpoint_last.pt", map_location="cpu")
    one = train_one_process(root, root / "ft1", [*args, "--update-freq", "2"])
    assert_same_training_state(two, one, "--finetune-from-model, 2 processes vs 1 process --update-freq 2")
