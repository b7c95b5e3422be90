"""Synthetic shape scenes for both tasks, written in OFA's TSV formats, deterministic for a seed.

Each image holds 1-6 objects (circle/square/triangle, 6 colours, small/large, random position, partial
overlaps, pixel noise) described by a scene graph. From the graph come 5 reference captions (a small
grammar, so a tiny model can learn it; one-object scenes are really easy) and three SNLI-VE hypotheses per
image, one per class: entailment (a true statement about visible attributes), contradiction (a false one:
wrong colour, shape, count or side) and neutral (something the picture cannot settle: material, weight,
what happens next, who drew it, an object hidden behind another).

Output (``DIR`` = --out):
  caption/{train,valid,test}.tsv  uniq-id, image-id, caption, object labels, base64 PNG, difficulty
                                  (train: one caption per line, one line per reference; valid/test: one
                                  line per image, references joined with '&&')
  caption/{split}_refs.json       COCO-style references (images[].id, annotations[].image_id/caption)
  snli_ve/{train,valid,test}.tsv  uniq-id, image-id, base64 PNG, hypothesis, premise, label, difficulty
  scenes/{split}.jsonl            the scene graph of every image
  dict.txt                        fairseq dict of the BPE ids of every word the grammar can write,
                                  prompts and answers included (the same for any seed and split sizes)
  meta.json                       the generation settings
``difficulty`` (the number of objects, 1-6) is an extra final column: OFA's layout stays a prefix, so
OFA-format readers still work, and ``mue.data.readers`` picks it up. --num-train etc. count images.
Each split has its own random stream (seed, split), so changing one split's size leaves the others alone.
"""
import argparse
import base64
import io
import json
import os
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Dict, List

import numpy as np
from PIL import Image, ImageDraw

from mue.data.tokenizer import (SNLI_VE_PREMISE_PROMPT, SNLI_VE_PROMPT, Tokenizer, normalize_text, task_texts,
                                write_dict_for_corpus)

COLORS = {"red": (215, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 215),
          "yellow": (225, 200, 30), "purple": (140, 60, 180), "orange": (240, 130, 30)}
SHAPES = ("circle", "square", "triangle")
# Object radius as a fraction of the image side. At 0.10 / 0.17 (6-11 px in the demo's 64 px images) the micro
# model trained in the demo's budget hardly read the objects: its layer 2 kept 105 % of the full model's CIDEr.
# At 0.15 / 0.22 with caption stage 1 at lr 3e-4 it read them, and layer 2 kept 75 % (stage 1, 200 valid images).
SIZES = {"small": 0.15, "large": 0.22}
NUMBERS = ("no", "one", "two", "three", "four", "five", "six", "seven")
MATERIALS = ("wood", "metal", "paper", "glass", "plastic")
FEELS = ("heavy", "light", "warm", "cold", "soft", "hard")
DIRECTIONS = ("left", "right", "up", "down")
WHEN = ("yesterday", "this morning", "last week")
WHO = ("a child", "an artist", "a robot")
SPLITS = ("train", "valid", "test")
# The words the caption and hypothesis templates write besides the lists above (plus the attributes,
# numbers and plurals `grammar_words` adds). The dictionary comes from them, not from the drawn texts,
# so it does not change with the seed or a split's size; `generate` checks every text it writes is covered.
TEMPLATE_WORDS = ("a an and the there is are only single group of on gray background object objects shape "
                  "shapes colors in left right above below image shows made will move next someone drew was "
                  "painted by hidden behind").split()
LABELS = ("entailment", "contradiction", "neutral")


@dataclass
class Obj:
    shape: str
    color: str
    size: str
    x: float  # centre, pixels
    y: float
    r: float  # radius, pixels

    def noun(self, with_size: bool = False) -> str:
        return " ".join(([self.size] if with_size else []) + [self.color, self.shape])


def a(phrase: str) -> str:
    """Phrase with its indefinite article."""
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def counted(k: int, noun: str) -> str:
    """'a red circle', 'two red circles'."""
    return a(noun) if k == 1 else f"{NUMBERS[k]} {noun}s"


def join(items: List[str]) -> str:
    """'x', 'x and y', 'x, y and z'."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


# ----------------------------------------------------------------------------------------------- scenes
def sample_scene(rng: np.random.Generator, image_size: int, max_objects: int = 6) -> List[Obj]:
    """1..max_objects objects; centres kept >= 0.8 (r1 + r2) apart, so overlaps only hide edges."""
    objects: List[Obj] = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        shape = SHAPES[rng.integers(len(SHAPES))]
        color = list(COLORS)[rng.integers(len(COLORS))]
        size = list(SIZES)[rng.integers(len(SIZES))]
        for size_try in ([size, "small"] if size == "large" else [size]):
            r = SIZES[size_try] * image_size
            for _ in range(60):
                x, y = rng.uniform(r, image_size - r, size=2)
                if all(np.hypot(x - o.x, y - o.y) >= 0.8 * (r + o.r) for o in objects):
                    objects.append(Obj(shape, color, size_try, float(x), float(y), float(r)))
                    break
            else:
                continue
            break
    return objects


def relations(objects: List[Obj]) -> List[tuple]:
    """(i, 'left of' | 'above', j) for pairs clearly apart along that axis."""
    rels = []
    for i, p in enumerate(objects):
        for j, q in enumerate(objects):
            gap = max(p.r, q.r)
            if i != j and q.x - p.x > gap:
                rels.append((i, "left of", j))
            if i != j and q.y - p.y > gap:
                rels.append((i, "above", j))
    return rels


def render(objects: List[Obj], image_size: int, rng: np.random.Generator) -> Image.Image:
    """Draw at 2x and downsample (smooth edges), then add Gaussian pixel noise."""
    s = 2
    bg = tuple(int(v) for v in rng.integers(185, 236) + rng.integers(-8, 9, size=3))
    img = Image.new("RGB", (image_size * s, image_size * s), bg)
    draw = ImageDraw.Draw(img)
    for o in objects:
        fill = tuple(int(np.clip(v + rng.integers(-15, 16), 0, 255)) for v in COLORS[o.color])
        x, y, r = o.x * s, o.y * s, o.r * s
        if o.shape == "circle":
            draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
        elif o.shape == "square":
            h = 0.8 * r
            draw.rectangle((x - h, y - h, x + h, y + h), fill=fill)
        else:
            draw.polygon([(x, y - r), (x - 0.87 * r, y + 0.5 * r), (x + 0.87 * r, y + 0.5 * r)], fill=fill)
    img = img.resize((image_size, image_size), Image.LANCZOS)
    pixels = np.asarray(img, dtype=np.float32) + rng.normal(0.0, 6.0, size=(image_size, image_size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8), "RGB")


# --------------------------------------------------------------------------------------------- captions
def caption_candidates(objects: List[Obj]) -> List[str]:
    """Distinct true descriptions of the scene from a small grammar."""
    n = len(objects)
    by_x = sorted(objects, key=lambda o: o.x)
    groups = Counter(o.noun() for o in by_x)  # insertion order = left to right
    listing = join([counted(k, noun) for noun, k in groups.items()])
    if n == 1:
        o = objects[0]
        return [a(o.noun()), a(o.noun(True)), f"one {o.noun()}", f"there is {a(o.noun())}",
                f"a single {o.noun()}", f"{a(o.noun())} on a gray background"]
    cands = [listing]
    if n <= 3:
        cands += [f"{NUMBERS[n]} objects: {listing}", f"{NUMBERS[n]} shapes: {listing}",
                  join([a(o.noun(True)) for o in by_x]), join([a(o.noun()) for o in reversed(by_x)])]
        if n == 2 and len(groups) == 2:
            left, right = by_x
            if right.x - left.x > max(left.r, right.r):
                cands.append(f"{a(left.noun())} left of {a(right.noun())}")
            top, bottom = sorted(objects, key=lambda o: o.y)
            if bottom.y - top.y > max(top.r, bottom.r):
                cands.append(f"{a(top.noun())} above {a(bottom.noun())}")
    else:
        shapes = Counter(o.shape for o in by_x)
        colors = Counter(o.color for o in by_x)
        shape_list = join([counted(k, s) for s, k in shapes.items()])
        cands += [f"{NUMBERS[n]} objects: {shape_list}", shape_list,
                  join([counted(k, f"{c} shape") for c, k in colors.items()]),
                  f"{NUMBERS[n]} shapes in {NUMBERS[len(colors)]} colors",
                  f"a group of {NUMBERS[n]} shapes"]
        if len(groups) > 3:
            cands.remove(listing)
    return list(dict.fromkeys(cands))


def pick_refs(rng: np.random.Generator, cands: List[str], k: int) -> List[str]:
    order = [cands[i] for i in rng.permutation(len(cands))]
    return [order[i % len(order)] for i in range(k)]


# ------------------------------------------------------------------------------------------- hypotheses
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def scene_facts(objects: List[Obj]) -> Dict[str, set]:
    """What is true of the scene, by kind of statement, as structured facts (see `say`)."""
    nouns = Counter(o.noun() for o in objects)
    facts = {
        "presence": {(o.color, o.shape) for o in objects},
        "sized presence": {(o.size, o.color, o.shape) for o in objects},
        "object count": {len(objects)},
        "shape count": set(Counter(o.shape for o in objects).items()),
        "relation": set(),
    }
    for i, rel, j in relations(objects):
        p, q = objects[i].noun(), objects[j].noun()
        if nouns[p] == 1 and nouns[q] == 1:  # "the red circle" must name one object
            facts["relation"] |= {(p, rel, q), (q, OPPOSITE[rel], p)}  # both ways of saying it
    return facts


def is_false(kind: str, fact, facts: Dict[str, set]) -> bool:
    """Whether `fact` (of `kind`) contradicts a scene with `facts` (relations: only between objects the
    scene names uniquely, else the statement would be undecidable rather than false)."""
    if kind == "shape count":
        shape, k = fact
        return k != dict(facts["shape count"]).get(shape, 0)
    if kind == "relation":
        p, rel, q = fact
        return (p, OPPOSITE[rel], q) in facts["relation"]
    return fact not in facts[kind]


def phrasings(kind: str, fact) -> List[str]:
    """The ways the generator words a fact (an object count has two)."""
    def how_many(k, noun):  # an exact count: "there is only one square", "there are two squares"
        return f"there is only one {noun}" if k == 1 else f"there are {counted(k, noun)}"

    if kind in ("presence", "sized presence"):
        return [f"there is {a(' '.join(fact))}"]
    if kind == "object count":
        shows = "only one shape" if fact == 1 else counted(fact, "shape")
        return [how_many(fact, "object"), f"the image shows {shows}"]
    if kind == "shape count":
        return [how_many(fact[1], fact[0])]
    p, rel, q = fact
    return [f"the {p} is {rel} the {q}"]


def say(kind: str, fact, rng: np.random.Generator) -> str:
    """A fact in words, one of its phrasings at random."""
    ways = phrasings(kind, fact)
    return ways[rng.integers(len(ways))] if len(ways) > 1 else ways[0]


def false_facts(kind: str, facts: Dict[str, set]) -> list:
    """Every false fact of `kind` the generator can state about a scene with `facts`."""
    if kind == "relation":
        return sorted((p, OPPOSITE[rel], q) for p, rel, q in facts["relation"])
    if kind == "presence":
        domain = [(c, s) for c in COLORS for s in SHAPES]
    elif kind == "sized presence":
        domain = [(z, c, s) for z in SIZES for c in COLORS for s in SHAPES]
    elif kind == "object count":
        domain = list(range(1, 8))
    else:
        domain = [(s, k) for s in SHAPES for k in range(1, 7)]
    return [f for f in domain if is_false(kind, f, facts)]


def neutral_statements(objects: List[Obj]) -> List[str]:
    """Statements the image cannot decide. Their own templates give them away, as SNLI-VE's neutral
    hypotheses are partly given away by their wording."""
    neu = []
    for o in objects:
        the = f"the {o.noun()}"
        other = [f"{c} {s}" for c in COLORS for s in SHAPES if (c, s) != (o.color, o.shape)]
        neu += [f"{the} is made of {m}" for m in MATERIALS] + [f"{the} is {f}" for f in FEELS]
        neu += [f"{the} will move {d} next" for d in DIRECTIONS]
        neu += [f"someone drew {the} {w}" for w in WHEN] + [f"{the} was painted by {w}" for w in WHO]
        neu += [f"there is {a(x)} hidden behind {the}" for x in other[:: 4]]
    return list(dict.fromkeys(neu))


def hypothesis_candidates(objects: List[Obj]) -> Dict[str, List[str]]:
    """True, false and undecidable statements about the scene, by SNLI-VE label."""
    facts = scene_facts(objects)
    ent = [h for kind, fs in facts.items() for f in sorted(fs) for h in phrasings(kind, f)]
    con = [h for kind in facts for f in false_facts(kind, facts) for h in phrasings(kind, f)]
    return {"entailment": list(dict.fromkeys(ent)), "contradiction": list(dict.fromkeys(con)),
            "neutral": neutral_statements(objects)}


def sample_hypothesis(rng: np.random.Generator, objects: List[Obj], label: str, image_size: int,
                      max_objects: int) -> str:
    """One hypothesis of `label`, made so that its wording does not give an entailment or a
    contradiction away: both first pick a kind of statement (uniformly among the kinds the scene can
    state both ways), and a contradiction is a true fact of another random scene that is false here,
    so true and false statements share their templates and about their word distributions."""
    if label == "neutral":
        neu = neutral_statements(objects)
        return neu[rng.integers(len(neu))]
    facts = scene_facts(objects)
    kinds = [kind for kind, fs in facts.items() if fs]  # every kind but relations has true facts
    kind = kinds[rng.integers(len(kinds))]
    if label == "entailment":
        pool = sorted(facts[kind])
        return say(kind, pool[rng.integers(len(pool))], rng)
    if kind == "relation":
        pool = false_facts(kind, facts)
        return say(kind, pool[rng.integers(len(pool))], rng)
    for _ in range(100):
        other = sorted(scene_facts(sample_scene(rng, image_size, max_objects))[kind])
        fact = other[rng.integers(len(other))]
        if is_false(kind, fact, facts):
            return say(kind, fact, rng)
    pool = false_facts(kind, facts)  # e.g. a scene of six objects, when other scenes keep matching it
    return say(kind, pool[rng.integers(len(pool))], rng)


def sample_hypotheses(rng: np.random.Generator, objects: List[Obj], count: int, image_size: int,
                      max_objects: int) -> List[tuple]:
    """``count`` (label, hypothesis) pairs about one scene, count / 3 of each label, as real SNLI-VE has
    several hypotheses per image; distinct where the scene allows (a one-object scene has few true facts)."""
    pairs = []
    for label in LABELS:
        seen = set()
        for _ in range(count // len(LABELS)):
            for _ in range(20):
                hyp = sample_hypothesis(rng, objects, label, image_size, max_objects)
                if hyp not in seen:
                    break
            seen.add(hyp)
            pairs.append((label, hyp))
    return pairs


# ------------------------------------------------------------------------------------------------ dictionary
def grammar_words() -> List[str]:
    """Every word and punctuation mark the generator can write (captions raw and normalised, hypotheses)."""
    words = list(TEMPLATE_WORDS) + list(COLORS) + list(SHAPES) + [s + "s" for s in SHAPES] + list(SIZES)
    words += list(NUMBERS) + list(MATERIALS) + list(FEELS) + list(DIRECTIONS)
    words += [w for phrase in WHEN + WHO for w in phrase.split()]
    return list(dict.fromkeys(words + [":", ","]))


def check_covered(texts: List[str], dict_path: str) -> None:
    """Raise if a written text has a BPE id missing from the grammar's dictionary (a template word
    left out of TEMPLATE_WORDS): the tasks would refuse that text later, far from the cause."""
    with open(dict_path, encoding="utf-8") as f:
        known = {line.split()[0] for line in f if line.strip()}
    tokenizer = Tokenizer()
    for text in dict.fromkeys(texts):
        for form in task_texts(text):
            missing = [i for i in tokenizer.bpe_ids(form).split() if i not in known]
            if missing:
                raise ValueError(f"the synthetic grammar wrote {text!r}, whose BPE ids {missing} are not in "
                                 f"{dict_path}: add its words to mue.data.synthetic.TEMPLATE_WORDS")


# ------------------------------------------------------------------------------------------------ writer
def _png_base64(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _write_split(out_dir: str, split: str, split_index: int, num_images: int, seed: int, image_size: int,
                 refs_per_image: int, max_objects: int, hypotheses_per_image: int,
                 texts: List[str]) -> Dict[str, str]:
    rng = np.random.default_rng([seed, split_index])
    hyp_rng = np.random.default_rng([seed, split_index, 1])  # hypotheses apart: changing them keeps the scenes
    paths = {"caption": os.path.join(out_dir, "caption", f"{split}.tsv"),
             "refs": os.path.join(out_dir, "caption", f"{split}_refs.json"),
             "snli_ve": os.path.join(out_dir, "snli_ve", f"{split}.tsv"),
             "scenes": os.path.join(out_dir, "scenes", f"{split}.jsonl")}
    refs_json = {"info": {"description": f"mue synthetic shapes, {split} references, seed {seed}"},
                 "licenses": [], "type": "captions", "images": [], "annotations": []}
    with open(paths["caption"], "w", encoding="utf-8", newline="\n") as cap_f, \
            open(paths["snli_ve"], "w", encoding="utf-8", newline="\n") as ve_f, \
            open(paths["scenes"], "w", encoding="utf-8", newline="\n") as sc_f:
        for i in range(num_images):
            image_id = f"{split}_{i:06d}"
            objects = sample_scene(rng, image_size, max_objects)
            image = _png_base64(render(objects, image_size, rng))
            n = len(objects)
            labels_col = ",".join(o.noun() for o in objects)
            refs = pick_refs(rng, caption_candidates(objects), refs_per_image)
            if split == "train":
                for k, ref in enumerate(refs):
                    cap_f.write(f"{image_id}_{k}\t{image_id}\t{ref}\t{labels_col}\t{image}\t{n}\n")
            else:
                cap_f.write(f"{image_id}\t{image_id}\t{'&&'.join(refs)}\t{labels_col}\t{image}\t{n}\n")
            refs_json["images"].append({"id": image_id, "difficulty": n})
            for ref in refs:
                refs_json["annotations"].append(
                    {"image_id": image_id, "id": len(refs_json["annotations"]), "caption": ref})
            premise = refs[0]
            for k, (label, hyp) in enumerate(sample_hypotheses(hyp_rng, objects, hypotheses_per_image,
                                                               image_size, max_objects)):
                ve_f.write(f"{image_id}_{k}\t{image_id}\t{image}\t{hyp}\t{premise}\t{label}\t{n}\n")
                texts += [SNLI_VE_PROMPT.format(hypothesis=normalize_text(hyp)),
                          SNLI_VE_PREMISE_PROMPT.format(premise=normalize_text(premise),
                                                        hypothesis=normalize_text(hyp))]
            texts += refs + [normalize_text(r) for r in refs]
            scene = {"image_id": image_id, "objects": [asdict(o) for o in objects],
                     "relations": relations(objects)}
            sc_f.write(json.dumps(scene, sort_keys=True) + "\n")
    with open(paths["refs"], "w", encoding="utf-8") as f:
        json.dump(refs_json, f, sort_keys=True)
    return paths


def generate(out_dir: str, seed: int = 1, num_train: int = 1000, num_valid: int = 200, num_test: int = 200,
             image_size: int = 64, refs_per_image: int = 5, max_objects: int = 6,
             hypotheses_per_image: int = 3) -> Dict[str, object]:
    """Write the synthetic benchmark under ``out_dir``; returns {"dict": path, "meta": path,
    "train"/"valid"/"test": {"caption", "refs", "snli_ve", "scenes"} paths}."""
    if not 1 <= max_objects <= 7:
        raise ValueError(f"max_objects must be in 1..7, got {max_objects}")
    if hypotheses_per_image < len(LABELS) or hypotheses_per_image % len(LABELS):
        raise ValueError(f"hypotheses_per_image must be a positive multiple of {len(LABELS)} (labels balanced), "
                         f"got {hypotheses_per_image}")
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16, got {image_size}")
    for sub in ("caption", "snli_ve", "scenes"):
        os.makedirs(os.path.join(out_dir, sub), exist_ok=True)
    texts: List[str] = []
    sizes = {"train": num_train, "valid": num_valid, "test": num_test}
    result: Dict[str, object] = {}
    for k, split in enumerate(SPLITS):
        result[split] = _write_split(out_dir, split, k, sizes[split], seed, image_size, refs_per_image,
                                     max_objects, hypotheses_per_image, texts)
    result["dict"] = os.path.join(out_dir, "dict.txt")
    write_dict_for_corpus(grammar_words(), result["dict"])
    check_covered(texts, result["dict"])
    result["meta"] = os.path.join(out_dir, "meta.json")
    meta = {"generator": "mue.data.synthetic", "seed": seed, "image_size": image_size,
            "refs_per_image": refs_per_image, "max_objects": max_objects, "num_images": sizes,
            "hypotheses_per_image": hypotheses_per_image,
            "difficulty": "number of objects (last TSV column)"}
    with open(result["meta"], "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1, sort_keys=True)
    return result


def main(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m mue.data.synthetic",
        description="Write a deterministic synthetic shapes benchmark (COCO-style captioning and SNLI-VE) "
                    "in OFA's TSV formats, plus a small dict.txt. Layout: DIR/caption/{split}.tsv, "
                    "DIR/caption/{split}_refs.json, DIR/snli_ve/{split}.tsv, DIR/scenes/{split}.jsonl, "
                    "DIR/dict.txt, DIR/meta.json. The last TSV column is the difficulty (number of objects).")
    p.add_argument("--out", required=True, help="output directory (created if missing; files are overwritten)")
    p.add_argument("--seed", type=int, default=1, help="random seed; same seed gives byte-identical files")
    p.add_argument("--num-train", type=int, default=1000, help="training images (caption: one line per "
                   "reference; SNLI-VE: 3 hypotheses per image)")
    p.add_argument("--num-valid", type=int, default=200, help="validation images")
    p.add_argument("--num-test", type=int, default=200, help="test images")
    p.add_argument("--image-size", type=int, default=64, help="side of the square images, pixels (>= 16)")
    p.add_argument("--refs-per-image", type=int, default=5, help="reference captions per image")
    p.add_argument("--max-objects", type=int, default=6, help="most objects per image (1..7); "
                   "difficulty is uniform over 1..max")
    p.add_argument("--hypotheses-per-image", type=int, default=3, help="SNLI-VE hypotheses per image, a "
                   "multiple of 3 (as many of each label)")
    args = p.parse_args(argv)
    result = generate(args.out, args.seed, args.num_train, args.num_valid, args.num_test, args.image_size,
                      args.refs_per_image, args.max_objects, args.hypotheses_per_image)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
