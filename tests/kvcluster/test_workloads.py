"""Tests for kvcluster.workloads: determinism, resemblance per kind, sizes, disjoint pools."""
from __future__ import annotations

import math
import random
import subprocess
import sys

import pytest

from kvcluster import workloads as w

RESEMBLING = ("reordered_documents", "changed_instruction", "inserted_sentences", "conversation", "faq")


@pytest.fixture(scope="module")
def families() -> list[w.PromptFamily]:
    return w.build_workload(36, seed=0, n_followups=2)


def by_kind(families, kind):
    out = [f for f in families if f.kind == kind]
    assert out, kind
    return out


def shingles(text: str, n: int = 4) -> set[tuple[str, ...]]:
    words = text.split()
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def containment(a: str, b: str) -> float:
    """Fraction of a's word 4-grams that also occur in b (order of blocks does not matter)."""
    sa = shingles(a)
    return len(sa & shingles(b)) / max(1, len(sa))


def common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def test_deterministic_and_seed_dependent():
    a = w.build_workload(12, seed=3)
    assert a == w.build_workload(12, seed=3)
    assert a != w.build_workload(12, seed=4)


def test_smaller_workload_is_a_prefix_of_larger():
    assert w.build_workload(7, seed=1) == w.build_workload(14, seed=1)[:7]


def test_kinds_round_robin_and_validation(families):
    assert [f.kind for f in families[: len(w.KINDS)]] == list(w.KINDS)
    assert all(len(f.followups) == 2 for f in families)
    only = w.build_workload(4, kinds=["faq"], seed=0)
    assert {f.kind for f in only} == {"faq"}
    with pytest.raises(ValueError):
        w.build_workload(2, kinds=["nope"])
    with pytest.raises(ValueError):
        w.build_workload(2, kinds=[])


def test_resembling_families_overlap_and_unrelated_do_not(families):
    for f in families:
        donor = w.prompt_text(f.donor)
        for fu in f.followups:
            c = containment(w.prompt_text(fu), donor)
            if f.kind in RESEMBLING:
                assert f.meta["expect_reuse"] and c > 0.6, (f.kind, c)
            else:
                assert not f.meta["expect_reuse"] and c < 0.2, c


def doc_blocks(prompt: str) -> list[str]:
    body = prompt.split("\n\nQuestion:")[0]
    return body.split("\n\nDocument ")[1:]


def test_reordered_documents_same_docs_other_order(families):
    for f in by_kind(families, "reordered_documents"):
        donor_docs = [b.split(": ", 1)[1] for b in doc_blocks(f.donor)]
        assert 3 <= len(donor_docs) <= 5
        for fu, order in zip(f.followups, f.meta["orders"]):
            fu_docs = [b.split(": ", 1)[1] for b in doc_blocks(fu)]
            assert sorted(fu_docs) == sorted(donor_docs)
            assert fu_docs == [donor_docs[i] for i in order] and fu_docs[0] != donor_docs[0]
            # Not a prefix extension: only the instruction line is an exact shared prefix.
            assert not fu.startswith(f.donor)
            assert common_prefix(fu, f.donor) < 0.2 * len(f.donor)
            assert fu.startswith("Answer the question") and "Question: " in fu


def test_changed_instruction_same_context(families):
    fams = by_kind(w.build_workload(40, kinds=["changed_instruction"], seed=2), "changed_instruction")
    assert {f.meta["source"] for f in fams} == {"code", "wikipedia"}
    assert {f.meta["instruction_position"] for f in fams} == {"before", "after"}
    for f in fams:
        ins = f.meta["instructions"]
        assert len(set(ins)) == len(ins) == 2
        context = f.donor.replace(ins[0], "").strip()
        fu = f.followups[0]
        assert fu.replace(ins[1], "").strip() == context and fu != f.donor
        if f.meta["source"] == "code":
            assert "def " in context and context.startswith("```python")


def test_inserted_sentences_edit_script(families):
    for f in by_kind(families, "inserted_sentences"):
        donor_sents = w.split_sentences(f.donor.split("Passage:\n")[1].split("\n\nQuestion:")[0])
        for fu, edit in zip(f.followups, f.meta["edits"]):
            fu_sents = w.split_sentences(fu.split("Passage:\n")[1].split("\n\nQuestion:")[0])
            kept = [s for s in fu_sents if s in donor_sents]
            n_deleted = 1 if "delete" in edit["op"] else 0
            n_inserted = len(edit["inserted_at"])
            assert ("insert" in edit["op"]) == (1 <= n_inserted <= 3)
            assert len(kept) >= len(donor_sents) - n_deleted  # donor order kept, <= 1 removed
            assert len(fu_sents) - len(kept) <= n_inserted
            assert fu != f.donor and not fu.startswith(f.donor)


def test_conversation_is_chat_messages(families):
    variants = set()
    for f in by_kind(w.build_workload(30, kinds=["conversation"], seed=5), "conversation"):
        d = f.donor
        assert d[0]["role"] == "system" and d[-1]["role"] == "user" and len(d) >= 4
        roles = [m["role"] for m in d[1:]]
        assert all(r == ("user" if i % 2 == 0 else "assistant") for i, r in enumerate(roles))
        for fu, variant in zip(f.followups, f.meta["variants"]):
            variants.add(variant)
            if variant == "next_turn":
                assert fu[: len(d)] == d and len(fu) == len(d) + 2 and fu[-1]["role"] == "user"
            else:
                assert fu[:-1] == d[:-1] and fu[-1]["role"] == "user"
                assert fu[-1]["content"] != d[-1]["content"]
    assert variants == {"next_turn", "reworded_last"}


def qa_pairs(system: str) -> list[str]:
    return system.split("\n\n")[1:]


def test_faq_same_pairs_shuffled_other_question(families):
    for f in by_kind(families, "faq"):
        pairs = qa_pairs(f.donor[0]["content"])
        assert len(pairs) >= 3 and all(p.startswith("Q: ") for p in pairs)
        for fu in f.followups:
            fu_pairs = qa_pairs(fu[0]["content"])
            assert sorted(fu_pairs) == sorted(pairs) and fu_pairs != pairs
            assert fu[1]["role"] == "user" and fu[1]["content"] != f.donor[1]["content"]


def test_families_do_not_share_paragraphs(families):
    titles = []
    for f in families:
        if f.kind in ("reordered_documents", "inserted_sentences"):
            titles += f.meta["titles"]
        elif f.kind == "unrelated":
            titles += [t for group in f.meta["titles"] for t in group]
    assert len(titles) == len(set(titles))


@pytest.mark.parametrize("max_chars", [1200, 3000, 6000])
def test_size_knob(max_chars):
    fams = w.build_workload(36, seed=0, max_chars=max_chars)
    sizes = {k: [len(w.prompt_text(p)) for f in fams if f.kind == k for p in [f.donor, *f.followups]]
             for k in w.KINDS}
    assert max(max(v) for v in sizes.values()) <= 1.15 * max_chars
    # Document kinds fill most of the budget; chats and FAQs can be short by nature.
    docs = [n for k in ("reordered_documents", "changed_instruction", "unrelated") for n in sizes[k]]
    assert sum(docs) / len(docs) >= 0.6 * max_chars


def test_many_followups_stay_distinct():
    for f in w.build_workload(12, seed=0, n_followups=8):
        assert len(f.followups) == 8
        if f.kind in ("changed_instruction", "faq", "reordered_documents", "unrelated"):
            assert len({w.prompt_text(p) for p in f.followups}) >= 4, f.kind


def test_calibration_and_heldout_disjoint(families):
    cal = w.calibration_paragraphs()
    held = w.heldout_paragraphs(200)
    assert len(cal) == 30 and len(held) == 200
    assert cal == w.calibration_paragraphs(30, 0)  # deterministic
    assert w.calibration_paragraphs(10, 5) == cal[5:15]
    assert not set(cal) & set(held)
    assert not set(w.calibration_paragraphs(1000)) & set(w.heldout_paragraphs(2000))
    assert min(len(p) for p in cal + held) >= 400  # room for a 64-token window
    text = "\n".join(w.prompt_text(p) for f in families for p in [f.donor, *f.followups])
    assert not any(p[:200] in text for p in cal + held)
    with pytest.raises(ValueError):
        w.heldout_paragraphs(10, offset=1_000_000)


def test_poisson_arrivals():
    t = w.poisson_arrivals(5000, qps=4.0, seed=1)
    assert t == w.poisson_arrivals(5000, qps=4.0, seed=1)
    assert t != w.poisson_arrivals(5000, qps=4.0, seed=2)
    assert all(b > a for a, b in zip(t, t[1:])) and t[0] > 0
    assert t[-1] / len(t) == pytest.approx(0.25, rel=0.05)
    assert w.poisson_arrivals(3, math.inf) == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError):
        w.poisson_arrivals(3, 0.0)


def test_request_stream_keeps_donor_first(families):
    stream = w.request_stream(families, seed=0)
    assert stream == w.request_stream(families, seed=0)
    assert len(stream) == sum(1 + len(f.followups) for f in families)
    seen: dict[int, int] = {}
    for r in stream:
        assert r.position == seen.get(r.family, -1) + 1  # positions arrive in order
        seen[r.family] = r.position
    assert [r.family for r in stream] != sorted(r.family for r in stream)  # interleaved


def test_reword_changes_wording():
    rng = random.Random(0)
    for text in ["I really like good movies", "Nothing to swap here", "Yes"]:
        assert w.reword(text, rng) != text


def test_module_does_not_import_torch():
    code = "import sys, kvcluster.workloads; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
