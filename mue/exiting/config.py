"""ExitConfig: the one owner of MuE's inference exit knobs.

Every knob that decides where a row stops computing lives here once: its name, default, help text
and validation. The tasks inherit the fields (so `fairseq-generate --img-thres 0.9` and the hydra
configs see them as task options), the generator, sweep, benchmark and reports take an ExitConfig,
and `mue.exiting.settings.ExitSettings.from_config` turns one into what the model reads at run time.
Adding a knob means adding a field here (and its check in `check`) plus its use.

"A threshold >= 1 never exits" (NEVER_EXIT) is defined here and nowhere else; such thresholds
reproduce the full model exactly.
"""
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from fairseq.dataclass import ChoiceEnum, FairseqDataclass

from mue.errors import OptionError

#: the smallest threshold that disables exiting
NEVER_EXIT = 1.0
SCHEDULE_KINDS = ("constant", "decay", "reference")
KV_POLICIES = ("copy", "recompute", "drop")
EXIT_POLICIES = ("cosine", "entropy", "patience", "imitation")
COMPACTION = ("rows", "dense")
#: N of the decay schedule when not given: OFA's caption evaluation generates at most 16 tokens
DEFAULT_DECAY_LEN = 16


@dataclass
class ExitConfig(FairseqDataclass):
    img_thres: float = field(
        default=1.0, metadata={"help": "image-stream exit threshold: a row's image stream stops after the layer "
                                       "whose cosine similarity with the previous one exceeds it (>= 1: never)"})
    txt_thres: float = field(default=1.0, metadata={"help": "text-stream exit threshold (>= 1: never)"})
    dec_thres: float = field(
        default=1.0, metadata={"help": "decoder exit threshold theta, per generated token and beam row "
                                       "(>= 1: never)"})
    dec_schedule: ChoiceEnum(SCHEDULE_KINDS) = field(
        default="constant", metadata={"help": "decoder threshold over the steps t: constant; decay (the paper): "
                                              "beta*theta + (1-beta)*exp(-tau*t/N); reference (the public MuE "
                                              "code's variant, for comparison)"})
    dec_decay_beta: float = field(default=0.95, metadata={"help": "beta of the decay schedule, in [0, 1]"})
    dec_decay_tau: float = field(default=1.0, metadata={"help": "tau of the decay schedule, >= 0"})
    dec_decay_len: int = field(
        default=DEFAULT_DECAY_LEN,
        metadata={"help": "N of the decay/reference schedules: the number of steps the threshold decays over. "
                          "Fixed, so a row's thresholds never depend on its batch mates"})
    kv_policy: ChoiceEnum(KV_POLICIES) = field(
        default="copy", metadata={"help": "keys/values of decoder layers a token skipped: copy (computed from the "
                                          "exited state), recompute (the same, lazily, when a later token needs "
                                          "them), drop (masked holes, for comparison)"})
    dec_compaction: ChoiceEnum(COMPACTION) = field(
        default="rows", metadata={"help": "how a generation step skips the decoder layers of rows that exited: rows "
                                          "(run each layer on the rows still active, skip a layer no row "
                                          "reaches; one host sync per layer) or dense (run every row, keep exited "
                                          "rows' states; one host sync per step, but no layer skipped). Same "
                                          "results either way"})
    exit_policy: ChoiceEnum(EXIT_POLICIES) = field(
        default="cosine", metadata={"help": "decoder exit rule: cosine (MuE, --dec-thres), entropy (DeeBERT-style, "
                                            "--exit-entropy), patience (PABEE-style, --exit-patience), imitation "
                                            "(DeeCap-style heads, --exit-entropy); encoder streams always use "
                                            "cosine"})
    exit_entropy: float = field(
        default=0.0, metadata={"help": "entropy/imitation rules: exit when the prediction's entropy (nats) is "
                                       "below this (0: never)"})
    exit_patience: int = field(
        default=0, metadata={"help": "patience rule: exit once the argmax prediction stayed unchanged for this "
                                     "many consecutive layers (0: never)"})
    exit_depth: int = field(
        default=0, metadata={"help": "every stream (image, text, decoder) stops after this layer at the latest "
                                     "(0: no limit); with the thresholds at 1 it is the model cut to its first "
                                     "layers, the forced-depth curve"})


EXIT_KNOBS = tuple(f.name for f in dataclasses.fields(ExitConfig) if not f.name.startswith("_"))
THRESHOLD_KNOBS = ("img_thres", "txt_thres", "dec_thres")
TEXT_KNOBS = ("dec_schedule", "kv_policy", "dec_compaction", "exit_policy")
DEFAULTS = {f.name: f.default for f in dataclasses.fields(ExitConfig) if f.name in EXIT_KNOBS}


def option(name: str) -> str:
    """The command-line spelling of a knob: img_thres -> --img-thres."""
    return "--" + name.replace("_", "-")


def never_exits(threshold: float) -> bool:
    return float(threshold) >= NEVER_EXIT


# ---- validation: one function per kind of value ---------------------------------------------------
def _number(value, name: str, expected: str) -> float:
    if isinstance(value, bool) or value is None:
        raise OptionError(f"{name} must be {expected}, got {value!r}")
    if hasattr(value, "item") and getattr(value, "numel", lambda: 1)() == 1:
        value = value.item()
    try:
        return float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        raise OptionError(f"{name} must be {expected}, got {value!r}") from None


def validate_threshold(value, name: str = "threshold") -> float:
    """A cosine threshold: a number in [-1, inf) (>= 1 and inf never exit); NaN, -inf and text fail."""
    number = _number(value, name, "a number in [-1, inf)")
    if math.isnan(number) or number < -1.0:
        raise OptionError(f"{name} must be a number in [-1, inf), got {value!r}")
    return number


def validate_fraction(value, name: str) -> float:
    number = _number(value, name, "a number in [0, 1]")
    if not 0.0 <= number <= 1.0:
        raise OptionError(f"{name} must be in [0, 1], got {value!r}")
    return number


def validate_rate(value, name: str) -> float:
    number = _number(value, name, "a finite number >= 0")
    if not (math.isfinite(number) and number >= 0.0):
        raise OptionError(f"{name} must be a finite number >= 0, got {value!r}")
    return number


def validate_count(value, name: str, low: int = 0, meaning: str = "") -> int:
    number = _number(value, name, f"an integer >= {low}")
    if not math.isfinite(number) or number != int(number) or number < low:
        raise OptionError(f"{name} must be an integer >= {low}{meaning}, got {value!r}")
    return int(number)


def validate_exit_entropy(value, name: str = "--exit-entropy") -> float:
    """An entropy bound in nats (0 never exits)."""
    return validate_rate(value, name)


def validate_exit_patience(value, name: str = "--exit-patience") -> int:
    """Consecutive unchanged predictions (0 never exits)."""
    return validate_count(value, name, 0, " (0 never exits)")


def validate_choice(value, name: str, choices) -> str:
    text = str(value)
    if text not in choices:
        raise OptionError(f"{name} must be one of {', '.join(choices)}, got {text!r}")
    return text


def check(config: "ExitConfig") -> "ExitConfig":
    """Validate every knob (OptionError naming the option) and normalise the types in place."""
    c = config
    for name in THRESHOLD_KNOBS:
        setattr(c, name, validate_threshold(getattr(c, name), option(name)))
    c.dec_schedule = validate_choice(c.dec_schedule, "--dec-schedule", SCHEDULE_KINDS)
    c.dec_decay_beta = validate_fraction(c.dec_decay_beta, "--dec-decay-beta")
    c.dec_decay_tau = validate_rate(c.dec_decay_tau, "--dec-decay-tau")
    c.dec_decay_len = validate_count(c.dec_decay_len, "--dec-decay-len", 1)
    c.kv_policy = validate_choice(c.kv_policy, "--kv-policy", KV_POLICIES)
    c.dec_compaction = validate_choice(c.dec_compaction, "--dec-compaction", COMPACTION)
    c.exit_policy = validate_choice(c.exit_policy, "--exit-policy", EXIT_POLICIES)
    c.exit_entropy = validate_exit_entropy(c.exit_entropy)
    c.exit_patience = validate_exit_patience(c.exit_patience)
    c.exit_depth = validate_count(c.exit_depth, "--exit-depth", 0, " (0: no limit)")
    if c.exit_entropy > 0 and c.exit_policy not in ("entropy", "imitation"):
        raise OptionError(f"--exit-entropy is the knob of --exit-policy entropy/imitation, not {c.exit_policy}")
    if c.exit_patience > 0 and c.exit_policy != "patience":
        raise OptionError(f"--exit-patience is the knob of --exit-policy patience, not {c.exit_policy}")
    if c.exit_policy != "cosine" and not never_exits(c.dec_thres):
        knob = "--exit-patience" if c.exit_policy == "patience" else "--exit-entropy"
        raise OptionError(f"--dec-thres < 1 is the cosine rule's knob; --exit-policy {c.exit_policy} exits by {knob}")
    return c


def exit_config(source: Any = None, **overrides) -> ExitConfig:
    """A validated ExitConfig read off ``source`` (an ExitConfig, a task config, an argparse Namespace,
    an omegaconf node or a dict: only the exit knobs are read, missing ones take their defaults), with
    ``overrides`` applied on top."""
    if overrides.keys() - set(EXIT_KNOBS):
        raise OptionError(f"unknown exit knobs {sorted(overrides.keys() - set(EXIT_KNOBS))}; known: {EXIT_KNOBS}")
    values = {}
    for name in EXIT_KNOBS:
        if isinstance(source, Mapping) and name in source:
            values[name] = source[name]
        elif source is not None and not isinstance(source, Mapping) and hasattr(source, name):
            values[name] = getattr(source, name)
    values.update(overrides)
    config = ExitConfig()
    for name, value in values.items():
        setattr(config, name, str(value) if name in TEXT_KNOBS else value)
    return check(config)


def exits_requested(config) -> bool:
    """Whether any knob allows an exit (some threshold < 1, a baseline rule's knob > 0, a depth limit)."""
    c = exit_config(config)
    return (any(not never_exits(getattr(c, n)) for n in THRESHOLD_KNOBS)
            or c.exit_entropy > 0 or c.exit_patience > 0 or c.exit_depth > 0)


def as_record(config) -> dict:
    """Every knob, JSON-ready (the 'thresholds' of a result record)."""
    c = exit_config(config)
    return {name: getattr(c, name) for name in EXIT_KNOBS}


def describe(config) -> str:
    """One line for logs: the knobs that differ from the defaults (the schedule with its N)."""
    c = exit_config(config)
    parts = [f"{name}={getattr(c, name)}" for name in EXIT_KNOBS if getattr(c, name) != DEFAULTS[name]]
    if c.dec_schedule != "constant" and "dec_decay_len=" not in " ".join(parts):
        parts.append(f"dec_decay_len={c.dec_decay_len}")
    return ", ".join(parts) or "no exits (all defaults)"
