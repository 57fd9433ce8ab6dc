"""Data: corpus splits, tokenizers, text files, needle tasks and the grain pipeline."""

import json
import re

import numpy as np
import pytest

from l2a_jax import ConfigError
from l2a_jax.data import (
    NeedleMix,
    embedded_corpus,
    key_words,
    make_niah,
    make_tokenizer,
    read_text_files,
    sentences,
    training_batches,
)


@pytest.fixture(scope="module")
def docs():
    return embedded_corpus("train")


@pytest.fixture(scope="module")
def words(docs):
    return key_words(docs)


def test_embedded_corpus_holds_out_every_tenth_topic():
    from pydoc_data.topics import topics

    train, heldout = embedded_corpus("train"), embedded_corpus("heldout")
    names = sorted(topics)
    assert heldout == [topics[n] for n in names[9::10]]
    assert len(train) + len(heldout) == len(topics) and not set(train) & set(heldout)
    with pytest.raises(ConfigError, match="split 'test' is unknown"):
        embedded_corpus("test")


def test_byte_tokenizer_round_trips_text():
    tok = make_tokenizer("bytes")
    text = "Grüße, long context! 長い"
    assert tok.encode(text) == list(text.encode("utf-8"))
    assert tok.decode([*tok.encode(text), tok.eos_id]) == text
    assert tok.vocab_size == 257 and tok.eos_id == 256


def test_qwen_tokenizer_is_the_qwen_vocabulary():
    tok = make_tokenizer("qwen")
    # ids every Qwen2.5/Qwen3 tokenizer gives: "Hello" 9707, " world" 1879, "," 11
    assert tok.encode("Hello world,") == [9707, 1879, 11]
    text = "Learning when to attend: 128K tokens."
    ids = tok.encode(text)
    assert tok.decode(ids) == text and max(ids) < tok.vocab_size == 151936
    assert tok.eos_id == 151643
    # special-token text is encoded as plain text, never as a control token
    assert tok.eos_id not in tok.encode("<|endoftext|>")


def test_local_hf_tokenizer_directory(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<eos>": 0, "[UNK]": 1, "long": 2, "context": 3, "models": 4}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    hf = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<eos>", unk_token="[UNK]")
    hf.save_pretrained(tmp_path)
    tok = make_tokenizer(str(tmp_path))
    assert tok.encode("long context models") == hf.encode("long context models") == [2, 3, 4]
    assert tok.eos_id == 0 and tok.vocab_size == 5
    with pytest.raises(ConfigError, match="neither 'bytes', 'qwen' nor a local directory"):
        make_tokenizer(str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="holds no tokenizer"):
        make_tokenizer(str((tmp_path / "empty").mkdir() or tmp_path / "empty"))


def test_text_files(tmp_path):
    (tmp_path / "a.txt").write_text("first document")
    (tmp_path / "b.jsonl").write_text(
        json.dumps({"text": "second"}) + "\n\n" + json.dumps({"text": "third"}) + "\n"
    )
    assert read_text_files([str(tmp_path)]) == ["first document", "second", "third"]
    assert read_text_files([str(tmp_path / "b.jsonl")]) == ["second", "third"]
    (tmp_path / "bad.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl:1 is not a JSON object with a 'text'"):
        read_text_files([str(tmp_path / "bad.jsonl")])
    with pytest.raises(ConfigError, match="does not exist"):
        read_text_files([str(tmp_path / "nope.txt")])
    (tmp_path / "c.csv").write_text("x")
    with pytest.raises(ConfigError, match="unsupported file type"):
        read_text_files([str(tmp_path / "c.csv")])


@pytest.mark.parametrize("haystack", ["noise", "essay"])
@pytest.mark.parametrize("value_kind", ["numbers", "words", "uuids"])
def test_needle_task_fits_its_length_and_hides_one_needle(docs, words, haystack, value_kind, rng):
    tok = make_tokenizer("bytes")
    task = make_niah(
        rng, tok, 3000, words=words, haystack=haystack, value_kind=value_kind,
        essay=sentences(docs), depth=0.25,
    )  # fmt: skip
    total = len(tok.encode(task.prompt + task.answer))
    assert 2700 < total <= 3000
    needle = f"One of the special magic {value_kind} for {task.key} is: {task.value}."
    assert task.prompt.count(needle) == 1
    if value_kind != "words":  # a word value may also occur in real text
        assert task.prompt.count(task.value) == 1
    assert task.answer == f" {task.value}."
    assert task.prompt.endswith("mentioned in the provided text is")
    body = task.prompt.split("\n")[1]  # the haystack line
    assert abs(body.index(needle) / len(body) - 0.25) < 0.15  # placed between sentences
    if value_kind == "numbers":
        assert len(task.value) == 7 and task.value.isdigit()


def test_needle_task_too_short_and_bad_kinds(words, rng):
    tok = make_tokenizer("bytes")
    with pytest.raises(ConfigError, match="needs at least .* tokens"):
        make_niah(rng, tok, 50, words=words)
    with pytest.raises(ConfigError, match="haystack 'sand' is unknown"):
        make_niah(rng, tok, 500, words=words, haystack="sand")
    with pytest.raises(ConfigError, match="needs sentences of real text"):
        make_niah(rng, tok, 500, words=words, haystack="essay")
    with pytest.raises(ConfigError, match="needle rate must be in"):
        NeedleMix(rate=1.0)


def batches(docs, count, **kwargs):
    settings = dict(seq_len=512, batch_size=3, seed=0, needles=NeedleMix(rate=0.5))
    it = iter(training_batches(docs, make_tokenizer("bytes"), **{**settings, **kwargs}))
    return it, [next(it) for _ in range(count)]


def test_batches_are_packed_rows_with_segments_and_a_loss_mask(docs):
    _, got = batches(docs, 6)
    for batch in got:
        assert {k: v.shape for k, v in batch.items()} == {
            k: (3, 512) for k in ("input_ids", "positions", "segment_ids", "loss_mask")
        }
        seg, pos, mask = batch["segment_ids"], batch["positions"], batch["loss_mask"]
        # positions restart with every segment; the first token of a segment is not scored
        starts = np.concatenate([np.ones((3, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
        assert (pos[starts & (seg > 0)] == 0).all()
        np.testing.assert_array_equal(mask, ((seg > 0) & (pos > 0)).astype(np.float32))
    rows = [bytes(int(t) for t in row if t < 256) for b in got for row in b["input_ids"]]
    assert any(b"special magic numbers" in r for r in rows), "no needle row in 18 rows"
    assert any(b"special magic" not in r for r in rows), "no corpus row in 18 rows"


def test_task_rows_can_train_on_their_answers_alone(docs):
    _, every = batches(docs, 4)
    _, answers = batches(docs, 4, needles=NeedleMix(rate=0.5, loss="answer"))
    seen = 0
    for a, b in zip(every, answers, strict=True):
        np.testing.assert_array_equal(a["input_ids"], b["input_ids"])  # the same rows
        for ids, mask, full in zip(b["input_ids"], b["loss_mask"], a["loss_mask"], strict=True):
            text = bytes(int(t) for t in ids if t < 256)
            if b"special magic" not in text:
                np.testing.assert_array_equal(mask, full)  # corpus rows: every token
                continue
            seen += 1
            scored = bytes(int(t) for t, m in zip(ids, mask, strict=True) if m and t < 256)
            answer = re.search(rb"text is( \d{7}\.)", text).group(1)
            assert scored == answer and mask.sum() == len(answer) + 1  # and the eos
    assert seen
    with pytest.raises(ConfigError, match="needle loss 'some' is unknown"):
        NeedleMix(rate=0.5, loss="some")


def test_recall_drill_rows_hide_a_value_far_back_and_train_only_its_repeat(docs):
    mix = NeedleMix(rate=0.2, drill_rate=0.5, drill_length=48, drill_gap=16)
    _, got = batches(docs, 6, needles=mix)
    drills = 0
    for batch in got:
        keys = ("input_ids", "positions", "segment_ids", "loss_mask")
        for ids, pos, seg, mask in zip(*(batch[k] for k in keys), strict=True):
            text = bytes(int(t) for t in ids if t < 256)
            if b"?" not in text or b"special magic" in text:
                continue
            drills += 1
            assert seg.max() >= 8  # many documents packed per row
            for s in range(1, seg.max() + 1):
                doc, doc_mask = ids[seg == s], mask[seg == s]
                assert (pos[seg == s] == np.arange(len(doc))).all()
                assert 40 <= len(doc) <= 48 and doc[-1] == 256  # about 48 tokens, eos last
                body = bytes(int(t) for t in doc[:-1])
                m = re.fullmatch(rb"[a-z ]* (\d{7}) ([a-z ]+)\? (\d{7})\.", body)
                assert m and m.group(1) == m.group(3), body
                # the value ends at least drill_gap tokens before the question mark
                assert len(b" " + m.group(2)) >= 16
                scored = bytes(int(t) for t, k in zip(doc, doc_mask, strict=True) if k and t < 256)
                assert scored == b" " + m.group(1) + b"." and doc_mask.sum() == 10
            assert not mask[seg == 0].any()
    assert drills, "no drill row in 18 rows"
    for bad in (dict(drill_rate=0.6, rate=0.5), dict(drill_rate=-0.1), dict(drill_length=20)):
        with pytest.raises(ConfigError, match="drill"):
            NeedleMix(**bad)
    with pytest.raises(ConfigError, match="drill of 600 tokens does not fit 512"):
        batches(docs, 1, needles=NeedleMix(drill_rate=0.5, drill_length=600))


def test_batches_are_deterministic_and_resume_from_their_state(docs):
    it, first = batches(docs, 4)
    _, again = batches(docs, 4)
    _, other_seed = batches(docs, 4, seed=1)
    _, other_process = batches(docs, 4, process_index=1, process_count=2)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
    assert not np.array_equal(first[0]["input_ids"], other_seed[0]["input_ids"])
    assert not np.array_equal(first[0]["input_ids"], other_process[0]["input_ids"])
    state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
    want = [next(it) for _ in range(3)]
    resumed, _ = batches(docs, 0)
    resumed.set_state(state)
    for w in want:
        got = next(resumed)
        for key in w:
            np.testing.assert_array_equal(got[key], w[key])


@pytest.mark.parametrize(
    "needles",
    [NeedleMix(rate=0.0), NeedleMix(rate=0.3, drill_rate=0.6)],
    ids=["corpus", "mostly-generated"],
)
def test_resuming_through_json_at_every_batch_reads_the_same_batches(docs, needles):
    """Including a state saved before the corpus packer gave its first row (at 10% corpus, the
    first batches often hold none)."""
    settings = dict(seq_len=400, batch_size=2, needles=needles)
    _, want = batches(docs, 8, **settings)
    for k in range(6):
        it, _ = batches(docs, k, **settings)
        resumed, _ = batches(docs, 0, **settings)
        resumed.set_state(json.loads(json.dumps(it.get_state())))
        for w in want[k : k + 2]:
            np.testing.assert_array_equal(next(resumed)["input_ids"], w["input_ids"])


def test_bad_pipeline_settings(docs):
    with pytest.raises(ConfigError, match="needs at least .* tokens .* 255 is too short"):
        batches(docs, 0, seq_len=256)
    with pytest.raises(ConfigError, match="2 documents cannot feed 3 processes"):
        training_batches(
            ["a", "b"], make_tokenizer("bytes"), seq_len=8, batch_size=1, seed=0,
            process_index=2, process_count=3,
        )  # fmt: skip
