"""Evaluation: task generators against their definitions (EVAL.md), scoring, routed
fractions against a direct forward, outputs, resuming, and errors."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from l2a_jax import L2AConfig, ModelConfig, QwenModel, convert_to_l2a
from l2a_jax.config import ConfigError
from l2a_jax.data import embedded_corpus, key_words, make_tokenizer, sentences
from l2a_jax.data.needles import NOISE
from l2a_jax.evals import (
    RULER_TASKS,
    EvalSettings,
    Materials,
    evaluate,
    evaluate_ruler,
    parse_lengths,
    task_spec,
)
from l2a_jax.evals import run as eval_run
from l2a_jax.evals.scoring import found_fraction, score_generate, score_likelihood


@pytest.fixture(scope="module")
def materials():
    held_out = embedded_corpus("heldout")
    return Materials(key_words(embedded_corpus(), 5000), sentences(held_out), held_out)


@pytest.fixture(scope="module")
def tokenizers():
    return {"bytes": make_tokenizer("bytes"), "qwen": make_tokenizer("qwen")}


NEEDLE = re.compile(r"One of the special magic (\w+) for (\S+) is: (\S+)\.")


@pytest.mark.parametrize("name", [n for n, t in RULER_TASKS.items() if t.has_depth])
@pytest.mark.parametrize("tok_name, length", [("bytes", 3000), ("qwen", 2000), ("qwen", 6000)])
def test_needle_tasks_follow_their_definitions(name, tok_name, length, materials, tokenizers, rng):
    tok, spec = tokenizers[tok_name], task_spec(name)
    options = dict(spec.options)
    for depth in (0.0, 0.35, 1.0):
        s = spec.sample(rng, tok, length, materials, depth=depth)
        total = len(tok.encode(s.prompt + s.answer))
        # topped up word by word; a haystack of decoy needles within one (uncut) needle
        slack = 100 if options.get("haystack") == "needle" else 24  # a word, in bytes
        assert length - slack <= total <= length, total
        needles = NEEDLE.findall(s.prompt)
        asked = [v for kind, key, v in needles if key in s.keys]
        assert sorted(asked) == sorted(s.expected)
        assert s.answer == " " + ", ".join(s.expected) + "."
        assert len(s.expected) == options.get("num_values", 1) * options.get("num_queries", 1)
        others = [v for kind, key, v in needles if key not in s.keys]
        assert len(others) >= options.get("num_keys", 1) - options.get("num_queries", 1)
        if options.get("haystack") == "needle":
            assert len(others) > 10  # the haystack is decoy needles
        # the first asked needle at the requested depth, counted in tokens of the haystack
        head, rest = s.prompt.split("\n", 1)
        body = rest.rsplit("\n", 1)[0]
        first = next(m for m in NEEDLE.finditer(body) if m.groups()[1:] == (s.key, s.value))

        def haystack_only(text, asked=s.keys):  # decoys are the haystack of 'needle'
            if options.get("haystack") == "needle":
                return NEEDLE.sub(lambda n: "" if n.group(2) in asked else n.group(0), text)
            return NEEDLE.sub("", text)

        before = haystack_only(body[: first.start()])
        after = haystack_only(body[first.end() :])
        share = len(tok.encode(before)) / max(len(tok.encode(before + after)), 1)
        assert abs(share - depth) < 0.05, (depth, share)
        assert abs(s.depth - depth) < 0.05
        for distractor in s.distractors:
            assert distractor != s.answer and distractor.endswith(".")
        wording = "is" if len(s.expected) == 1 else "are"
        assert s.prompt.endswith(f"mentioned in the provided text {wording}")


def test_variable_tracking_and_common_words(materials, tokenizers, rng):
    tok = tokenizers["qwen"]
    vt = task_spec("vt").sample(rng, tok, 4000, materials)
    value = vt.keys[0]
    names = list(vt.expected)
    assert len(names) == 5 and all(re.fullmatch(r"[A-Z]{5}", n) for n in names)
    question = vt.prompt.rsplit("Question:", 1)
    chain = re.findall(r"VAR ([A-Z]{5}) = (VAR [A-Z]{5}|\d{5})\.", question[0].split("\n\n", 2)[2])
    assert chain[0] == (names[0], value)
    assert [b for _, b in chain[1:]] == [f"VAR {n}" for n in names[:-1]]
    assert vt.prompt.count(NOISE) > 10
    assert vt.prompt.endswith(f"5 variables are assigned the value {value}, they are:")
    assert 3900 <= len(tok.encode(vt.prompt + vt.answer)) <= 4000
    for length, freq, rare in ((3000, 6, 1), (5000, 30, 3)):
        cwe = task_spec("cwe").sample(rng, tok, length, materials)
        listing = cwe.prompt.split("\n\n", 1)[1].split("\nQuestion")[0]
        counts = {}
        for word in re.findall(r"^\d+\. (\S+)$", listing, flags=re.M):
            counts[word] = counts.get(word, 0) + 1
        assert sorted(w for w, c in counts.items() if c == freq) == sorted(cwe.expected)
        assert all(c == rare for w, c in counts.items() if w not in cwe.expected)
        assert cwe.answer == " " + ", ".join(cwe.expected) + "."
        assert length - 20 <= len(tok.encode(cwe.prompt + cwe.answer)) <= length


def test_too_short_and_unknown_tasks(materials, tokenizers, rng):
    with pytest.raises(ConfigError, match="needs at least"):
        task_spec("niah").sample(rng, tokenizers["bytes"], 100, materials)
    with pytest.raises(ConfigError, match="did you mean 'niah_multikey'"):
        task_spec("niah_multikye")
    assert parse_lengths("1k,2K,4096") == (1024, 2048, 4096)
    with pytest.raises(ConfigError, match="not a token count"):
        parse_lengths("4kb")
    assert found_fraction("The numbers are 123 and 456.", ["123", "789"]) == 0.5


def tiny_l2a(seed=0, mode="l2a"):
    cfg = ModelConfig(
        "Qwen3ForCausalLM", 257, 32, 64, 2, 4, 2, 8, qk_norm=True, max_position_embeddings=2048
    )
    model = convert_to_l2a(QwenModel(cfg, rngs=nnx.Rngs(seed)), L2AConfig(window=16, mode=mode))
    for i, layer in enumerate(model.layers):  # routers that route some tokens and not others
        w = jax.random.normal(jax.random.key(seed * 10 + i), layer.router[...].shape)
        layer.router[...] = w.astype(layer.router[...].dtype)
    return model


def direct_routed_fraction(model, tok, samples, answers=False):
    """Token-weighted routed fraction per layer of forwards over each prompt alone."""
    total, tokens = 0.0, 0
    for s in samples:
        ids = np.asarray([tok.encode(s.prompt)])
        _, stats = model.forward_with_stats(ids)
        total = total + np.asarray(stats.routed_fraction, np.float64) * ids.size
        tokens += ids.size
    return total / tokens


def test_routed_fractions_equal_a_direct_forward(materials, tokenizers, rng):
    tok, model = tokenizers["bytes"], tiny_l2a()
    samples = [task_spec("niah").sample(rng, tok, n, materials) for n in (600, 560, 590)]
    want = direct_routed_fraction(model, tok, samples)
    assert 0.05 < want.mean() < 0.95  # routers that decide
    prompts = [tok.encode(s.prompt) for s in samples]
    _, _, routed, tokens = score_generate(model, tok, samples, prompts, width=600, budget=16)
    assert tokens == sum(len(tok.encode(s.prompt)) for s in samples)
    np.testing.assert_allclose(routed, want, rtol=1e-5)
    _, routed, tokens = score_likelihood(model, tok, samples, prompts)
    np.testing.assert_allclose(routed, want, rtol=1e-5)
    # and end to end: what evaluate reports for a run equals the direct forwards of its prompts
    settings = EvalSettings((700,), (0.5,), samples=3, batch_size=2, scoring="generate")
    out = evaluate(model, tok, "niah", settings, materials, rng_dir := _tmp(rng), source="t")
    cell_rng = np.random.default_rng([0, 700, 1, sum(map(ord, "niah"))])
    again = [
        task_spec("niah").sample(cell_rng, tok, 700, materials, depth=0.5, reserve=16)
        for _ in range(3)
    ]
    np.testing.assert_allclose(
        out["routed_fraction"], direct_routed_fraction(model, tok, again), rtol=1e-5
    )
    assert (rng_dir / "niah.json").exists()


def _tmp(rng):
    import tempfile
    from pathlib import Path

    return Path(tempfile.mkdtemp(prefix="l2a-eval-"))


def test_random_weights_score_near_zero_and_outputs(materials, tokenizers, tmp_path):
    tok = tokenizers["bytes"]
    model = tiny_l2a(seed=3)
    settings = EvalSettings((600, 800), (0.0, 0.5, 1.0), samples=3, batch_size=3)
    result = evaluate(model, tok, "niah", settings, materials, tmp_path, source="random")
    saved = json.loads((tmp_path / "niah.json").read_text())
    assert saved == json.loads(json.dumps(result))
    for key in ("task", "scoring", "lengths", "depths", "accuracy", "samples", "routed_fraction",
                "model", "date", "device", "versions", "seconds_per_sample"):  # fmt: skip
        assert key in saved
    assert saved["scoring"] == "generate" and saved["depths"] == [0.0, 0.5, 1.0]
    assert np.asarray(saved["accuracy"]).shape == (2, 3)
    assert np.max(saved["accuracy"]) <= 34  # a random model finds a 7-digit number by luck only
    assert len(saved["routed_fraction"]) == 2 and saved["l2a_layers"] == [0, 1]
    assert (tmp_path / "niah.png").stat().st_size > 1000
    assert (tmp_path / "niah_routing.png").stat().st_size > 1000
    assert not list(tmp_path.glob("*.partial.jsonl")) and not list(tmp_path.glob("*.tmp*"))
    likely = evaluate(
        model, tok, "niah", EvalSettings((600,), (0.5,), 6, 6, "likelihood"), materials, tmp_path
    )
    assert likely["scoring"] == "likelihood" and 0 <= likely["accuracy"][0][0] <= 100
    ppl = evaluate(model, tok, "ppl", EvalSettings((256, 512), samples=2), materials, tmp_path)
    assert ppl["scoring"] == "perplexity" and len(ppl["perplexity"]) == 2
    assert 100 < ppl["perplexity"][0] < 1000  # about the 257-token vocabulary for random weights
    assert len(ppl["nll_by_position"][1]) == 16


def test_an_interrupted_run_resumes_after_its_last_cell(
    materials, tokenizers, tmp_path, monkeypatch
):
    tok, model = tokenizers["bytes"], tiny_l2a()
    settings = EvalSettings((600,), (0.0, 0.5, 1.0), samples=2, batch_size=2)
    full = evaluate(model, tok, "niah", settings, materials, tmp_path / "full")
    calls = []
    original = eval_run._run_cell

    def crash_on_second(*args):
        calls.append(args[5])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(*args)

    monkeypatch.setattr(eval_run, "_run_cell", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        evaluate(model, tok, "niah", settings, materials, tmp_path / "cut")
    assert not (tmp_path / "cut" / "niah.json").exists()  # nothing that looks finished
    assert (tmp_path / "cut" / "niah.partial.jsonl").exists()
    calls.clear()
    monkeypatch.setattr(eval_run, "_run_cell", lambda *a: calls.append(a[5]) or original(*a))
    again = evaluate(model, tok, "niah", settings, materials, tmp_path / "cut")
    assert calls == [(600, 0.5), (600, 1.0)]  # the first cell was kept
    assert again["accuracy"] == full["accuracy"]
    assert again["routed_fraction"] == pytest.approx(full["routed_fraction"])


def test_ruler_table_skips_what_does_not_fit(materials, tokenizers, tmp_path):
    tok, model = tokenizers["bytes"], tiny_l2a()
    settings = EvalSettings((1500,), (0.5,), samples=1, batch_size=4)
    result = evaluate_ruler(model, tok, settings, materials, tmp_path)
    assert "cwe" in result["skipped"]  # a 1500-byte list cannot hold 60 common-word lines
    assert set(result["table"]) == set(RULER_TASKS) - set(result["skipped"])
    assert result["average"]["1500"] == pytest.approx(
        np.mean([row["1500"] for row in result["table"].values()])
    )
    assert json.loads((tmp_path / "ruler.json").read_text())["table"] == result["table"]


def test_command_line_errors(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import eval as cli

    with pytest.raises(SystemExit, match="did you mean 'niah'"):
        cli.main(["--task", "nia", "--hf", str(tmp_path)])
    with pytest.raises(SystemExit, match="does not exist"):
        cli.main(["--task", "niah", "--hf", str(tmp_path / "missing")])
    model = tiny_l2a()
    from l2a_jax import to_hf

    to_hf(model, tmp_path / "hf")
    with pytest.raises(SystemExit, match="exceed the model's context of 2048"):
        cli.main(["--task", "niah", "--hf", str(tmp_path / "hf"), "--tokenizer", "bytes",
                  "--lengths", "4k"])  # fmt: skip
    assert jnp.asarray(0).dtype  # the process is still usable after the errors


def test_a_damaged_progress_file_starts_the_run_over(tmp_path):
    header = {"task": "niah", "settings": {"lengths": (600,)}}
    path = tmp_path / "niah.partial.jsonl"
    cell = json.dumps({"cell": [600, 0.5]})
    path.write_text('{"task": "nia' + "\n" + cell + "\n")  # the header line cut short
    assert eval_run._Progress(path, header).cells == {}
    path.write_text(json.dumps(header) + "\n" + cell + "\n" + '{"cell": [600, 1')  # a cut cell
    assert list(eval_run._Progress(path, header).cells) == [(600, 0.5)]
    assert path.read_text().count("\n") == 2  # rewritten without the cut line
