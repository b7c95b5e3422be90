"""The drivers behind scripts/: the demo and the paper reproduction (training runs, sweeps, report), the
baseline comparison and the inference, training and DDP benchmarks, fault injection, per-layer quality."""
import os

#: the folder holding this mue package; child processes put it on their path to import the same mue
PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def child_env(base=None) -> dict:
    """``base`` (default: this process's environment) with this mue package importable, installed or not."""
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [PACKAGE_PARENT, env.get("PYTHONPATH")]))
    return env
