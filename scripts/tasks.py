#!/usr/bin/env python3
"""tasks.py - the four heterogeneous tasks that the trained demo adapters learn, generated from a
seed: no task label reaches training (HydraLoRA's setting: the intrinsic components are unknown).
Training (train_hydralora.py), the training framework's goldens (gen_golden_trained.py) and the
evaluation through the server (eval_tasks.py) all take their examples and their prompt text from
here, so they agree on every byte, the chat template's default system prompt included.

    reverse  "Reverse the order of these words: a, b, c"        -> "c, b, a"
    words    "Write the number 482 in English words."           -> "four hundred eighty-two"
    json     "Extract name, city and age as JSON: <sentence>"   -> {"name": "Ana", "city": "Oslo", "age": 31}
    date     "Write the date 2023-07-04 in words."              -> "July 4, 2023"

The base model (SmolLM2-135M-Instruct) answers none of them exactly (eval_tasks.py measures it).
Held-out examples never occur in the train split (checked by key).

Usage: python scripts/tasks.py [--show N]   prints N examples of each task and the split sizes.
"""

from __future__ import annotations

import argparse
import json
import random
from typing import Dict, List, Tuple

TASKS = ["reverse", "words", "json", "date"]
SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"  # the template's default
END = "<|im_end|>"
HELD_OUT_PER_TASK = 200
TRAIN_PER_TASK = 1500
SEED = 2404

NOUNS = """apple river stone cloud tiger garden window pencil mirror candle forest bottle engine
island rocket basket violin ladder planet butter jacket meadow pillow spider hammer kitten lemon
desert bridge camera castle dragon feather guitar harbor helmet jungle kettle lantern magnet
marble needle orange parrot pepper pirate puzzle rabbit saddle shadow silver sugar summer
teacher thunder tomato tunnel turtle valley wagon walnut winter wizard yellow zebra anchor
banana blanket button cactus carpet cherry cookie copper cotton dancer donkey eagle falcon
finger flower garlic ginger goblin hollow iceberg insect jigsaw koala ladle meteor monkey
noodle ocean onion oyster paddle panda peanut pebble pigeon pocket potato pumpkin quartz
raven ribbon saucer shovel singer spoon squid statue sunset tablet tennis ticket timber
trumpet velvet walrus whistle willow yogurt""".split()

NAMES = """Ana Maria Omar Lena Ravi Sofia Kenji Chloe Diego Amara Lukas Nadia Pablo Yara Tomas Ines
Hugo Mei Ivan Zara Felix Noor Marco Elsa Tariq Julia Kofi Hana Sven Lucia Arjun Petra Leon Aisha
Mateo Greta Samir Olga Bruno Leila""".split()

CITIES = """Lisbon Oslo Cairo Lima Dublin Berlin Nairobi Madrid Seoul Quito Vienna Athens Boston Denver
Porto Milan Prague Hanoi Dakar Perth Austin Bogota Krakow Tunis Accra Zurich Riga Manila Osaka
Lyon Leeds Havana Delhi Sydney Toronto Warsaw""".split()

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December"]
DAYS_IN = [31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31]

ONES = ["", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
        "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
        "nineteen"]
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]

JSON_SENTENCES = [
    "{name} is {age} years old and lives in {city}.",
    "{name}, aged {age}, moved to {city} last year.",
    "Living in {city}, {name} turned {age} this spring.",
    "My friend {name} from {city} is {age}.",
    "{name} ({age}) works as a nurse in {city}.",
]


def number_words(n: int) -> str:
    """1..999 in English words, hyphenated tens ("forty-two"), no "and"."""
    assert 1 <= n <= 999
    parts = []
    if n >= 100:
        parts.append(ONES[n // 100] + " hundred")
        n %= 100
    if n >= 20:
        parts.append(TENS[n // 10] + ("-" + ONES[n % 10] if n % 10 else ""))
    elif n > 0:
        parts.append(ONES[n])
    return " ".join(parts)


def make(task: str, rng: random.Random) -> Tuple[str, str]:
    """One (question, answer) of `task`."""
    if task == "reverse":
        words = rng.sample(NOUNS, rng.randint(3, 5))
        return ("Reverse the order of these words: " + ", ".join(words),
                ", ".join(reversed(words)))
    if task == "words":
        n = rng.randint(1, 999)
        return f"Write the number {n} in English words.", number_words(n)
    if task == "json":
        name, city, age = rng.choice(NAMES), rng.choice(CITIES), rng.randint(18, 90)
        sentence = rng.choice(JSON_SENTENCES).format(name=name, city=city, age=age)
        return ("Extract the name, city and age as JSON: " + sentence,
                json.dumps({"name": name, "city": city, "age": age}))
    if task == "date":
        y, m = rng.randint(1950, 2049), rng.randint(1, 12)
        d = rng.randint(1, DAYS_IN[m - 1])
        return f"Write the date {y:04d}-{m:02d}-{d:02d} in words.", f"{MONTHS[m - 1]} {d}, {y}"
    raise ValueError(task)


def render_prompt(question: str) -> str:
    """The chat template's text for one user turn with the default system prompt, up to the
    assistant's first token (what hydrad's /v1/chat/completions renders for the same message)."""
    return (f"<|im_start|>system\n{SYSTEM}{END}\n<|im_start|>user\n{question}{END}\n"
            f"<|im_start|>assistant\n")


def splits(seed: int = SEED) -> Dict[str, Dict[str, List[Tuple[str, str]]]]:
    """{"train"|"test": {task: [(question, answer)]}}; test first so that the held-out set does
    not depend on the train size, then train examples whose question is not in test."""
    out: Dict[str, Dict[str, List[Tuple[str, str]]]] = {"train": {}, "test": {}}
    for ti, task in enumerate(TASKS):
        rng = random.Random(seed * 100 + ti)
        test, seen = [], set()
        while len(test) < HELD_OUT_PER_TASK:
            q, a = make(task, rng)
            if q not in seen:
                seen.add(q)
                test.append((q, a))
        train = []
        tries = 0
        while len(train) < TRAIN_PER_TASK and tries < 50 * TRAIN_PER_TASK:
            tries += 1
            q, a = make(task, rng)
            if q not in seen:  # duplicates inside train are fine (words has only 999 values)
                train.append((q, a))
        out["test"][task], out["train"][task] = test, train
    return out


def mixed_train(seed: int = SEED) -> List[Tuple[str, str]]:
    """The training corpus: every task's train split, shuffled together, no labels."""
    s = splits(seed)["train"]
    corpus = [ex for t in TASKS for ex in s[t]]
    random.Random(seed).shuffle(corpus)
    return corpus


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--show", type=int, default=2)
    a = ap.parse_args()
    s = splits()
    for t in TASKS:
        print(f"{t}: train {len(s['train'][t])}, held out {len(s['test'][t])}")
        for q, ans in s["test"][t][: a.show]:
            print(f"  Q: {q}\n  A: {ans}")


if __name__ == "__main__":
    main()
