"""`cosy say` for documents of any length: the splitter and the ordered merge (cosy/segments.py), then the
command itself on real stacks (Piper and the tone engine), with its captions and every output format."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cosy import protocol as P
from cosy.client import Audio, Completed, Failed, Rejected
from cosy.segments import (
    MergeDone,
    MergeFailed,
    OrderedMerge,
    PartAudio,
    PartDone,
    Retrying,
    SentenceSplitter,
    TextTooLong,
    split_sentences,
    split_text,
)

# --- the splitter -------------------------------------------------------------------------------------------


def _letters(text: str) -> str:
    return "".join(text.split())


def test_a_long_sentence_is_cut_at_a_clause_then_at_a_word() -> None:
    clause = "the rain kept falling on the old roof of the house, "
    sentence = (clause * 12).strip().rstrip(",") + "."
    parts = split_sentences(sentence, max_chars=200)
    assert len(parts) > 1 and all(len(p) <= 200 for p in parts)
    assert all(p.endswith(",") for p in parts[:-1]), parts  # each cut right after a comma
    assert _letters(" ".join(parts)) == _letters(sentence)

    words = " ".join(["word"] * 100) + "."  # no clause mark at all: cut between words
    parts = split_sentences(words, max_chars=120)
    assert all(len(p) <= 120 for p in parts) and len(parts) == 5
    assert all(re.fullmatch(r"(word ?)+\.?", p) for p in parts), parts

    paragraph = "A paragraph with no full stop at all but many words " * 500  # 26,000 chars: more than a job
    assert len(paragraph) > P.MAX_TEXT_CHARS
    parts = split_sentences(paragraph)
    assert all(len(p) <= 400 for p in parts) and _letters(" ".join(parts)) == _letters(paragraph)


def test_a_run_with_nowhere_to_cut_fits_one_job_or_is_refused() -> None:
    run = "x" * 1000
    assert split_sentences(f"Before it. {run} after.", max_chars=400) == ["Before it.", run, "after."]
    with pytest.raises(TextTooLong, match="at most 20000"):
        split_sentences("y" * (P.MAX_TEXT_CHARS + 1))


def test_abbreviations_join_the_next_sentence_and_short_exclamations_stand() -> None:
    assert split_text("Dr. Smith came home. He slept.") == ["Dr. Smith came home. He slept."]
    assert split_sentences("Dr. Smith came home. Then he slept well.") == [
        "Dr. Smith came home.", "Then he slept well."]
    assert split_sentences("Oh! That was a long night indeed.") == ["Oh!", "That was a long night indeed."]
    # Streamed, as the Wyoming gateway and `cosy say -` feed it: "Dr." waits for the rest.
    sp = SentenceSplitter()
    assert sp.add("We met Dr. ") == []
    assert sp.add("Who yesterday. And") == ["We met Dr. Who yesterday."]
    assert sp.add(" then? ") == ["And then?"]


def test_streamed_text_gives_sentences_as_they_complete() -> None:
    sp = SentenceSplitter()
    assert sp.add("The first sentence is here.") == []  # the stop may still be "...here.5"
    assert sp.add(" The second") == ["The first sentence is here."]
    assert sp.pending
    assert sp.add(" one ends here.\n\nA new paragraph without an end") == ["The second one ends here."]
    assert sp.flush() == ["A new paragraph without an end"]
    assert not sp.pending and sp.flush() == []
    cjk = SentenceSplitter()
    assert cjk.add("今天天气很好，我们一起去公园散步吧。明天") == ["今天天气很好，我们一起去公园散步吧。"]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["Dr.", "Hello there.", "word", "words,", "Yes!", "\n\n", " ", "  ", "x" * 50,
                                 "a long clause goes here;", "What?", "e.g.", "。", "你好", "end."]), max_size=80),
       st.integers(min_value=20, max_value=400), st.lists(st.integers(min_value=1, max_value=30), max_size=20))
def test_nothing_is_dropped_or_reordered(tokens: list[str], max_chars: int, cuts: list[int]) -> None:
    text = " ".join(tokens)
    whole = split_sentences(text, max_chars=max_chars)
    assert _letters("".join(whole)) == _letters(text)
    assert all(p.strip() == p and p for p in whole)
    assert all(len(p) <= max_chars or not re.search(r"\s", p) for p in whole), whole  # longer: a run
    # The same text streamed in arbitrary pieces keeps every character in order too.
    sp = SentenceSplitter(max_chars=max_chars)
    got: list[str] = []
    at = 0
    for n in cuts:
        got += sp.add(text[at:at + n])
        at += n
    got += sp.add(text[at:]) + sp.flush()
    assert _letters("".join(got)) == _letters(text)
    segments = split_text(text, max_chars=max_chars)
    assert _letters("".join(segments)) == _letters(text)


# --- the ordered merge, fed events by hand --------------------------------------------------------------------

RATE = 22050


def _done(job: str, run: str, samples: int, worker: str = "w") -> P.JobDone:
    return P.JobDone(job, run, 1, 1, samples, RATE, 50.0, 0.1, worker)


def _audio(job: str, data: bytes, run: str = "r1") -> Audio:
    return Audio(job, run, 1, data, RATE, False)


def _completed(job: str, data: bytes, run: str = "r1", worker: str = "w") -> Completed:
    return Completed(job, data, RATE, _done(job, run, len(data) // 2, worker), 0)


def _pcm(tag: int, n: int = 4) -> bytes:
    return bytes([tag, 0]) * n


def test_the_merge_gives_audio_in_order_from_events_out_of_order() -> None:
    merge = OrderedMerge("doc", window=3)
    for text in ("one", "two", "three", "four"):
        merge.add(text)
    merge.close()
    first = merge.submissions(0.0)
    assert [s.job for s in first] == ["doc-0"]  # alone until it sounds
    merge.feed(_audio("doc-0", _pcm(1)), 0.0)
    out = merge.take()
    assert out == [PartAudio(0, _pcm(1), RATE, False)]
    subs = merge.submissions(0.0)
    assert [s.index for s in subs] == [1, 2]  # the window: three from the head on
    merge.feed(_audio("doc-2", _pcm(3)), 0.0)
    merge.feed(_completed("doc-2", _pcm(3)), 0.0)
    merge.feed(_audio("doc-1", _pcm(2, 2)), 0.0)
    assert merge.take() == []  # behind the head: held
    assert merge.submissions(0.0) == []  # the window is full until the head is done
    merge.feed(_completed("doc-0", _pcm(1), worker="a"), 0.0)
    out += merge.take()
    assert out[1] == PartDone(0, "one", _pcm(1), RATE, _done("doc-0", "r1", 4, "a"), 0)
    assert out[2] == PartAudio(1, _pcm(2, 2), RATE, False)  # the new head's held chunks
    merge.feed(_audio("doc-1", _pcm(2, 2)), 0.0)
    merge.feed(_completed("doc-1", _pcm(2), worker="b"), 0.0)
    out += merge.take()
    assert [s.index for s in merge.submissions(0.0)] == [3]
    merge.feed(_completed("doc-3", _pcm(4)), 0.0)  # no live events at all: the whole part at once
    out += merge.take()
    audio = b"".join(o.data for o in out if isinstance(o, PartAudio))
    assert audio == _pcm(1) + _pcm(2) + _pcm(3) + _pcm(4)
    assert [o.index for o in out if isinstance(o, PartDone)] == [0, 1, 2, 3]
    (end,) = [o for o in out if isinstance(o, MergeDone)]
    assert end.done.samples == 16 and end.parts == 4 and end.done.worker == "a,b,w"
    assert isinstance(out[-1], MergeDone) and merge.complete


def test_a_failed_part_is_retried_and_its_restart_is_marked() -> None:
    merge = OrderedMerge("doc", window=2, retries=2)
    merge.add("first sentence")
    merge.close()
    (sub,) = merge.submissions(0.0)
    merge.feed(_audio(sub.job, _pcm(1)), 0.0)
    merge.feed(Failed(sub.job, P.ENGINE_ERROR, "boom"), 1.0)
    out = merge.take()
    assert out[0] == PartAudio(0, _pcm(1), RATE, False)
    assert isinstance(out[1], Retrying) and out[1].tries == 1 and not out[1].busy
    assert merge.submissions(1.0) == []  # backs off first
    (again,) = merge.submissions(2.0)
    assert again.job != sub.job and again.text == "first sentence"
    merge.feed(_audio(again.job, _pcm(1), run="r2"), 2.0)
    merge.feed(_completed(again.job, _pcm(1), run="r2"), 2.0)
    out = merge.take()
    assert out[0] == PartAudio(0, _pcm(1), RATE, True)  # starts over: a player or a gateway must know
    assert isinstance(out[1], PartDone) and out[1].data == _pcm(1)
    assert isinstance(out[2], MergeDone)


def test_a_part_that_keeps_failing_fails_the_merge_with_its_position() -> None:
    merge = OrderedMerge("doc", window=2, retries=1)
    for text in ("fine one", "broken one", "never sent"):
        merge.add(text)
    merge.close()
    (s0,) = merge.submissions(0.0)
    merge.feed(_audio(s0.job, _pcm(1)), 0.0)
    s1 = merge.submissions(0.0)[0]
    for t in (0.0, 5.0):
        merge.feed(Failed(s1.job, P.ENGINE_ERROR, "the engine broke"), t)
        s1 = (merge.submissions(t + 5) or [s1])[0]
    out = merge.take()
    failed = out[-1]
    assert isinstance(failed, MergeFailed) and failed.index == 1 and failed.text == "broken one"
    assert failed.where == "sentence 2 of 3" and failed.message == "the engine broke"
    assert failed.code == P.ENGINE_ERROR
    assert merge.abandon() == [s0.job]  # what the driver must cancel
    assert merge.finished and not merge.complete and merge.submissions(99.0) == []


def test_busy_backs_off_without_counting_and_a_rejection_is_final() -> None:
    merge = OrderedMerge("doc", retries=0, busy_backoff=True, busy_timeout_s=10)
    merge.add("patient")
    merge.close()
    (s,) = merge.submissions(0.0)
    merge.feed(Rejected(s.job, P.BUSY, "the queue is full", []), 0.0)
    (r,) = merge.take()
    assert isinstance(r, Retrying) and r.busy
    (s,) = merge.submissions(1.0)
    merge.feed(Rejected(s.job, P.BUSY, "the queue is full", []), 11.0)  # still busy after busy_timeout_s
    (f,) = merge.take()
    assert isinstance(f, MergeFailed) and f.code == P.BUSY

    merge = OrderedMerge("doc2", retries=3)
    merge.add("who?")
    (s,) = merge.submissions(0.0)
    merge.feed(Rejected(s.job, P.UNKNOWN_VOICE, "unknown voice", ["a", "b"]), 0.0)
    (f,) = merge.take()
    assert isinstance(f, MergeFailed) and f.rejected and f.voices == ["a", "b"] and f.where == "sentence 1"


def test_an_attempt_past_its_deadline_is_cancelled_and_retried() -> None:
    merge = OrderedMerge("doc", retries=1, timeout_s=30)
    merge.add("slow")
    merge.close()
    (s,) = merge.submissions(0.0)
    assert merge.next_due() == 30.0 and merge.expire(29.0) == []
    assert merge.expire(30.0) == [s.job]
    (r,) = merge.take()
    assert isinstance(r, Retrying) and r.code == "TIMEOUT"
    assert not merge.owns(s.job)
