"""mue.recipes, the one table of training hyper-parameters: the yaml configs say what it says, its shell
form round-trips through bash, its schedules count updates as fairseq batches them, and bad requests are
refused clearly. (The shell scripts' and reproduce.py's use of it: test_train_scripts.py, test_reproduce.py.)"""
import subprocess
import sys
from pathlib import Path

import pytest
from fairseq import options
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from omegaconf import OmegaConf

import mue  # noqa: F401  (registers tasks, models, criterions)
from mue import recipes

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# yaml config -> (recipe, synthetic)
CONFIG_RECIPES = {name + suffix: (name, bool(suffix)) for name in recipes.RECIPES for suffix in ("", "_synthetic")}
# keys a launcher decides, not the recipe: folders, devices, logging, caches, the start checkpoint
LAUNCHER_KEYS = {"task.data", "criterion.scst_cider_df", "criterion.scst_refs", "model._name"}


def recipe_cfg(recipe: recipes.Recipe, pretrained: bool):
    """The full fairseq config that the recipe's command line gives (arch defaults filled in)."""
    _, total, warmup = recipe.schedule(rows=6400, nproc=1)  # (the real configs' counts are sized for COCO)
    argv = ["DATA", *recipe.train_options(pretrained), "--lr", str(recipe.lr), "--max-epoch", str(recipe.epochs),
            "--batch-size", str(recipe.batch_size), "--warmup-updates", str(warmup), "--total-num-update", str(total)]
    return convert_namespace_to_omegaconf(options.parse_args_and_arch(options.get_training_parser(), argv))


def leaves(node, prefix=""):
    """(dotted key, value) of a plain dict's leaves."""
    for key, value in node.items():
        if isinstance(value, dict):
            yield from leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def test_every_config_has_a_recipe():
    assert sorted(p.stem for p in CONFIGS.glob("*.yaml")) == sorted(CONFIG_RECIPES)


def compare(y, recipe: recipes.Recipe, synthetic: bool):
    """(keys compared, keys whose yaml value differs from the recipe's command line's)."""
    cfg = recipe_cfg(recipe, pretrained=not synthetic)
    sections = ["task", "model", "criterion", "optimizer", "checkpoint"]
    if synthetic:  # the real configs' schedule is sized for COCO / SNLI-VE's row counts
        sections.append("lr_scheduler")
    compared, differ = [], []
    for section in sections:
        plain = OmegaConf.to_container(y[section], resolve=False, throw_on_missing=False)  # "???" stays
        for key, value in leaves(plain, f"{section}."):
            if key in LAUNCHER_KEYS or key.startswith("checkpoint.") and key.split(".")[1] in (
                    "save_dir", "finetune_from_model", "no_epoch_checkpoints"):
                continue
            compared.append(key)
            if OmegaConf.select(cfg, key) != value:
                differ.append(key)
    per_update = y.dataset.batch_size * y.optimization.update_freq[0] * y.distributed_training.distributed_world_size
    for key, same in (("optimization.lr", y.optimization.lr == [recipe.lr]),
                      ("optimization.max_epoch", y.optimization.max_epoch == recipe.epochs),
                      ("optimization.clip_norm", y.optimization.clip_norm == cfg.optimization.clip_norm),
                      ("dataset.batch_size", y.dataset.batch_size == recipe.batch_size),
                      ("effective batch", per_update == (recipe.effective_batch or recipe.batch_size))):
        compared.append(key)
        if not same:
            differ.append(key)
    return compared, differ


@pytest.mark.parametrize("config", sorted(CONFIG_RECIPES))
def test_yaml_config_says_what_its_recipe_says(config):
    name, synthetic = CONFIG_RECIPES[config]
    compared, differ = compare(OmegaConf.load(CONFIGS / f"{config}.yaml"), recipes.recipe(name, synthetic), synthetic)
    assert differ == [], config
    # the comparison covered the recipe's substance, not just names
    for key in ("model.dropout", "model.encoder_drop_path_rate", "criterion._name", "task.patch_image_size",
                "model.encoder_embed_dim", "optimizer.weight_decay", "optimization.lr", "effective batch"):
        assert key in compared, (config, key)


def test_a_config_that_disagrees_is_caught():
    y = OmegaConf.load(CONFIGS / "caption_stage2_synthetic.yaml")
    y.model.encoder_drop_path_rate, y.criterion.scst_samples, y.optimization.lr = 0.1, 3, [1e-3]
    _, differ = compare(y, recipes.recipe("caption_stage2", synthetic=True), synthetic=True)
    assert sorted(differ) == ["criterion.scst_samples", "model.encoder_drop_path_rate", "optimization.lr"]
    changed = recipes.with_option(recipes.recipe("caption_stage1").options, "--dropout", "0.3")
    assert changed[changed.index("--dropout") + 1] == "0.3" and changed.count("--dropout") == 1
    with pytest.raises(KeyError, match="--scst-samples is not an option"):
        recipes.with_option(recipes.recipe("snli_ve").options, "--scst-samples", "3")


def test_freeze_only_for_a_pretrained_start():
    for name in recipes.RECIPES:
        for synthetic in (False, True):
            r = recipes.recipe(name, synthetic)
            assert "--freeze-embeddings" not in r.train_options(pretrained=False), name
            frozen = "--freeze-embeddings" in r.train_options(pretrained=True)
            assert frozen == name.startswith("caption"), name  # OFA freezes them for captioning only


def test_schedule_counts_updates_as_fairseq_batches():
    real = recipes.recipe("snli_ve")
    # 100 rows, batch 8 x 2 processes = 7 steps, update-freq 4 -> 2 updates per epoch, 5 epochs
    assert real.schedule(100, 2, effective_batch=32) == (2, 5 * 4, 1)
    assert real.schedule(100, 2) == (4, 10, 0)
    assert real.schedule(1000, 1, epochs=3) == (8, 48, 2)
    with pytest.raises(ValueError, match="not a multiple"):
        real.schedule(100, 3)
    synthetic = recipes.recipe("caption_stage1", synthetic=True)  # one step per update, fixed warm-up
    assert synthetic.schedule(5000, 1) == (1, 100000, 50)


def run_module(*argv):
    return subprocess.run([sys.executable, "-m", "mue.recipes", *argv], capture_output=True, text=True, timeout=120)


def test_shell_form_round_trips_through_bash():
    out = run_module("caption_stage2", "--pretrained", "--set", "scst-ce-weight=0.5")
    assert out.returncode == 0, out.stderr
    script = out.stdout + '\nprintf "%s\\n" "$RECIPE_LR" "$RECIPE_BATCH_SIZE" "[$RECIPE_WARMUP_UPDATES]" "${RECIPE_ARGS[@]}"'
    printed = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True).stdout.splitlines()
    r = recipes.recipe("caption_stage2")
    expected = recipes.with_option(r.train_options(pretrained=True), "--scst-ce-weight", "0.5")
    assert printed == [str(r.lr), "2", "[]", *expected]
    assert '{"beam": 5, "max_len_b": 16, "no_repeat_ngram_size": 3}' in printed  # one word, quotes kept


@pytest.mark.parametrize("argv, message", [
    (["caption_stage3"], "invalid choice: 'caption_stage3'"),
    (["snli_ve", "--set", "scst-ce-weight=0.5"], "--scst-ce-weight is not an option of this recipe"),
    (["snli_ve", "--set", "dropout"], "expected OPTION=VALUE"),
])
def test_bad_requests_are_refused(argv, message):
    out = run_module(*argv)
    assert out.returncode == 2 and message in out.stderr, out.stderr


def test_option_value_reads_a_flag_and_refuses_a_missing_one():
    options = recipes.recipe("caption_stage2").options
    assert recipes.option_value(options, "--scst-samples") == "5"
    assert recipes.option_value(recipes.with_option(options, "--scst-ce-weight", "0.3"), "--scst-ce-weight") == "0.3"
    with pytest.raises(KeyError, match="--freeze-embeddings is not an option"):
        recipes.option_value(options, "--freeze-embeddings")


def test_without_option_removes_a_flag_and_its_value_and_refuses_a_missing_one():
    options = recipes.recipe("caption_stage1", synthetic=True).train_options(pretrained=False)
    kept = recipes.without_option(options, "--label-smoothing")
    assert len(kept) == len(options) - 2 and "--label-smoothing" not in kept
    i = options.index("--label-smoothing")
    assert kept == options[:i] + options[i + 2:]
    with pytest.raises(KeyError, match="--scst-samples"):
        recipes.without_option(options, "--scst-samples")
