"""Writes the default task's prompt sets: movie-review openings of 2-8 words.

The openings are ours: hand-written subjects, verbs and lead-ins, combined and sampled with a
fixed seed. Train and eval sets are disjoint. Run: python scripts/make_prompts.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SUBJECTS = [
    "This movie",
    "The film",
    "This documentary",
    "The sequel",
    "This remake",
    "The plot",
    "The director's latest",
    "The lead actor",
    "The soundtrack",
    "The script",
    "The first half",
    "The ending",
    "The cast",
    "Her performance",
    "His new film",
    "This thriller",
    "The comedy",
    "This horror flick",
    "The animation",
    "The dialogue",
    "The cinematography",
    "This adaptation",
    "The villain",
    "The romance",
    "This war film",
    "The musical numbers",
    "The special effects",
    "The pacing",
    "The screenplay",
    "This indie drama",
    "The western",
    "The heist movie",
    "This biopic",
    "The opening scene",
    "The final act",
    "This cartoon",
    "The costume design",
    "The supporting cast",
    "This family film",
    "The courtroom drama",
    "The spy movie",
    "This sci-fi epic",
    "The love story",
    "The twist",
    "This low-budget picture",
    "The editing",
]
VERBS = [
    "was",
    "is",
    "felt",
    "starts with",
    "tries to",
    "reminded me of",
    "begins",
    "seems",
    "had",
    "turned out",
    "never quite",
    "manages to",
    "left me",
    "made me",
    "gets",
    "wants to",
    "could have been",
    "is supposed to",
    "somehow",
    "really",
    "is basically",
    "ends up",
    "kept me",
    "has",
    "was clearly",
]
LEAD_INS = [
    "I rented this",
    "I went in expecting",
    "After twenty minutes I",
    "My kids dragged me to",
    "Let me start by saying",
    "Honestly,",
    "When I first heard about",
    "I have seen this",
    "We watched this last",
    "I was not sure",
    "Nobody warned me that",
    "I bought the DVD",
    "My friends told me",
    "I saw this at",
    "I expected very little",
    "It took me years",
    "I caught this on",
    "As a fan of",
    "Having read the book,",
    "I remember seeing this",
    "I stumbled upon this",
    "Going into this film,",
    "Every few years someone",
    "I finally sat down",
    "On a rainy Sunday",
    "I streamed this late",
    "The trailer promised",
    "My grandmother loved",
    "I watched it twice",
    "Critics called this",
    "Years after its release,",
    "Halfway through I",
    "I walked out of",
    "Not many films",
    "Back in the nineties",
    "Out of curiosity I",
    "If you like",
    "I cannot believe that",
    "From the first frame",
    "Despite the hype,",
]
TIMES = ["Last night", "Yesterday", "Last weekend", "Tonight", "This morning", "Recently"]
WATCHES = [
    "I watched",
    "we saw",
    "I finally saw",
    "I rewatched",
    "my husband and I watched",
    "I tried",
    "we streamed",
]
OBJECTS = ["this film", "the sequel", "this movie", "a classic", "the remake", "this documentary"]


def candidates() -> list[str]:
    out = [f"{s} {v}" for s in SUBJECTS for v in VERBS]
    out += LEAD_INS
    out += [f"{t} {w} {o}" for t in TIMES for w in WATCHES for o in OBJECTS]
    return [c for c in dict.fromkeys(out) if 2 <= len(c.split()) <= 8]


def main() -> None:
    rng = random.Random(20240708)
    pool = candidates()
    rng.shuffle(pool)
    eval_set, train_set = pool[:200], pool[200:800]
    assert not set(eval_set) & set(train_set)
    data = Path(__file__).resolve().parent.parent / "vbon" / "data"
    for name, rows in (("prompts_train.jsonl", train_set), ("prompts_eval.jsonl", eval_set)):
        with (data / name).open("w") as f:
            for r in rows:
                f.write(json.dumps({"prompt": r}) + "\n")
        print(name, len(rows))


if __name__ == "__main__":
    main()
