"""Task causal_lm on tiny random decoders: instruction records, the response-only loss mask,
option scoring against a hand computation, and every strategy's round."""
import json

import pytest
import torch

from testbed.core.config import DataConfig, from_dict
from testbed.core.errors import TestbedError
from testbed.data import Split, fit, load_splits, prompt_ids, tokenize_instructions
from testbed.experiments.run import run_inprocess
from testbed.measure.scoring import option_logliks
from testbed.model.tiny import DECODERS, decoder_tokenizer, tiny_config
from testbed.server.strategies import STRATEGIES
from tests.helpers import LM, WORDS


@pytest.fixture(scope="module")
def tok():
    t = decoder_tokenizer()
    t.pad_token = t.eos_token  # as loading the model sets it
    return t


@pytest.mark.parametrize("chat", [False, True])
def test_only_the_response_and_eos_are_targets(tok, chat):
    tokens = tokenize_instructions(tok, Split(["the match ended", "a vote"], [1, 0], ["sports", "politics"]), 20,
                                   chat, WORDS)
    for i, (prompt, response) in enumerate([("the match ended", "sports"), ("a vote", "politics")]):
        p = prompt_ids(tok, [prompt], chat)[0]
        r = tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        n = len(p) + len(r)
        assert tokens.input_ids[i, :n].tolist() == p + r
        assert tokens.input_ids[i, n:].eq(tok.pad_token_id).all() and tokens.attention_mask[i].sum() == n
        assert tokens.labels[i].tolist() == [-100] * len(p) + r + [-100] * (20 - n)
        assert tokens.choices.prompt_lengths[i] == len(p)
    assert tokens.choices.answers.tolist() == [1, 0]
    assert tokens.choices.options == [tok(w, add_special_tokens=False)["input_ids"] for w in WORDS]
    if chat:  # a user turn, then the assistant's answer
        assert tok.decode(tokens.input_ids[0, :tokens.choices.prompt_lengths[0]]) == \
            "[MASK] user : the match ended [SEP] [MASK] assistant :"


def test_a_long_prompt_loses_its_middle_and_the_response_keeps_its_start():
    prompt, response = fit(list(range(100)), [1000, 1001, 1002], 10)
    assert response == [1000, 1001, 1002] and prompt == [0, 1, 2, 3, 97, 98, 99]
    prompt, response = fit([7, 8], list(range(1000, 1030)), 10)
    assert prompt == [7, 8] and response == list(range(1000, 1008))
    prompt, response = fit(list(range(30)), list(range(1000, 1030)), 10)
    assert len(prompt) == 5 and response == list(range(1000, 1005))


@pytest.mark.parametrize("family", DECODERS)
@torch.no_grad()
def test_option_scores_are_the_summed_log_likelihoods_computed_by_hand(tiny_decoders, family):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_decoders[family]).eval()
    prompts = [[101, 2023, 2003], [101, 1037, 2200, 2146, 6251, 2005], [101, 7592]]
    for options in ([[3835], [2204, 2767], [2009, 2003, 1037]], [[3835], [2204], [2009]]):
        got = option_logliks(model, prompts, options, pad_id=102, batch_size=4)  # batches mix lengths
        for i, p in enumerate(prompts):
            for j, o in enumerate(options):
                logp = model(input_ids=torch.tensor([p + o])).logits[0].log_softmax(-1)
                by_hand = sum(logp[len(p) - 1 + k, t] for k, t in enumerate(o))
                assert torch.allclose(got[i, j], by_hand, atol=1e-4), (i, j, got[i, j], by_hand)


def test_responses_from_labels_a_column_or_the_alpaca_template(tmp_path):
    rows = [{"instruction": "Name a colour.", "input": "", "output": "Blue."},
            {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}] * 5
    path = tmp_path / "instructions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DataConfig(source="files", train_file=str(path), test_file=str(path), prompt="alpaca")
    splits = load_splits(cfg, 0, "causal_lm")
    assert splits.options is None and splits.train.responses[:2] == ["Blue.", "5"]
    assert "### Instruction:\nName a colour.\n\n### Response:\n" in splits.train.texts[0]
    assert "### Input:\n2 and 3\n\n" in splits.train.texts[1] and "### Input" not in splits.train.texts[0]
    cfg = DataConfig(synthetic_train=20, synthetic_test=10, prompt="Topic of: {text}", label_words=WORDS)
    splits = load_splits(cfg, 0, "causal_lm")
    assert splits.options == WORDS and splits.train.texts[0].startswith("Topic of: ")
    assert splits.train.responses == [WORDS[y] for y in splits.train.labels]


def test_multiple_choice_rows_carry_their_own_options_in_the_prompt_and_answer_by_letter(tmp_path, tok):
    """Each question's options are columns the prompt shows; accuracy chooses among the letters."""
    path = tmp_path / "quiz.csv"
    rows = "Which is a colour?,blue,seven,run,under,A\nWhich is a number?,red,seven,walk,over,B\n"
    path.write_text("question,A,B,C,D,answer\n" + rows * 3)
    cfg = DataConfig(source="files", train_file=str(path), test_file=str(path), label_column="answer",
                     labels=["A", "B", "C", "D"], label_words=[" A", " B", " C", " D"],
                     prompt="{question}\nA. {A}\nB. {B}\nC. {C}\nD. {D}\nAnswer:")
    splits = load_splits(cfg, 0, "causal_lm")
    assert splits.train.texts[0] == "Which is a colour?\nA. blue\nB. seven\nC. run\nD. under\nAnswer:"
    assert splits.train.responses[:2] == [" A", " B"]
    tokens = tokenize_instructions(tok, splits.train, 40, chat=False, options=splits.options)
    assert len(tokens.choices.options) == 4 and tokens.choices.answers[:2].tolist() == [0, 1]


@pytest.mark.parametrize("raw, culprit", [
    ({"data.label_words": WORDS}, "data.label_words: applies to task causal_lm"),
    ({"task": "causal_lm"}, "data.label_words: task causal_lm needs"),
    ({"task": "causal_lm", "data.label_words": ["a", "b"]}, "data.label_words: 2 words for 4 labels"),
    ({"task": "causal_lm", "data.label_words": ["a", "a", "b", "c"]}, "data.label_words: lists a word twice"),
    ({"task": "causal_lm", "data.label_words": WORDS, "data.prompt": "{title}"}, "data.prompt: column 'title'"),
    ({"task": "causal_lm", "data.label_words": WORDS, "data.prompt": "{text"}, "data.prompt: not a valid template"),
])
def test_bad_causal_lm_settings_name_the_key(raw, culprit):
    with pytest.raises(TestbedError, match=culprit):
        cfg = from_dict(tiny_config("unused", **raw))
        load_splits(cfg.data, 0, cfg.task)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_runs_a_round_on_causal_lm(tiny_decoders, tmp_path, name):
    cfg = from_dict(tiny_config(tiny_decoders["llama"], rounds=1, **{"strategy.name": name}, **LM))
    summary = run_inprocess(cfg, tmp_path, quiet=True)
    row = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert summary["rounds"] == 1 and not summary["failures"]
    assert 0 <= row["accuracy"] <= 1 and row["perplexity"] > 1 and row["bytes_up"] > 0
    assert 0 <= row["zero_shot_accuracy"] <= 1 and summary["zero_shot_accuracy"] == row["zero_shot_accuracy"]


def test_runs_on_one_model_and_test_set_score_the_untuned_model_once(tiny_decoders, tmp_path, monkeypatch):
    from testbed.server import loop
    monkeypatch.setattr(loop, "ZERO_SHOT", {})
    base = tiny_config(tiny_decoders["llama"], rounds=1, **LM)

    def zero_shot(name: str, **changes) -> float:
        run_inprocess(from_dict({**base, **changes}), tmp_path / name, quiet=True)
        return json.loads((tmp_path / name / "metrics.jsonl").read_text())["zero_shot_loss"]

    first = zero_shot("fedlora")
    assert zero_shot("droppeft", strategy={"name": "droppeft"}) == first and len(loop.ZERO_SHOT) == 1
    fewer = zero_shot("fewer-test-rows", data={**base["data"], "synthetic_test": 32})
    assert fewer != first and len(loop.ZERO_SHOT) == 2
    loop.ZERO_SHOT.clear()  # computed afresh, the figure is the one the second run was given
    assert zero_shot("again") == first


def test_free_text_responses_report_loss_and_perplexity_but_no_accuracy(tiny_decoders, tmp_path):
    rows = [{"question": f"what is {i} plus one", "answer": f"it is {i + 1}"} for i in range(40)]
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = from_dict(tiny_config(tiny_decoders["gpt2"], rounds=1, task="causal_lm", data={
        "source": "files", "train_file": str(path), "test_file": str(path), "prompt": "Q: {question} A:",
        "response_column": "answer"}))
    run_inprocess(cfg, tmp_path / "run", quiet=True)
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    assert row["accuracy"] is None and row["zero_shot_accuracy"] is None
    assert row["test_loss"] < row["zero_shot_loss"] and row["perplexity"] > 1


def test_flop_counts_charge_a_causal_lm_head_on_every_token(tiny_decoders):
    from testbed.core.config import ModelConfig
    from testbed.measure.profiler import analytic_profile
    from testbed.model.info import model_info
    from testbed.model.load import load_backbone

    heads = {task: analytic_profile(model_info(load_backbone(ModelConfig(name=tiny_decoders["llama"]), 4, 0,
                                                             task=task)), "tiny", 32, 100.0).head_s
             for task in ("classification", "causal_lm")}
    assert heads["causal_lm"] > 16 * heads["classification"]  # every one of a row's 32 tokens, not once a row


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_one_token_options_are_scored_in_the_loss_pass_as_a_scoring_pass_scores_them(tiny_decoders, family):
    """Label words of one token each: the loss's pass (prompt, response and padding) gives every
    option the log-likelihood a pass over the prompt alone gives it, row for row."""
    from testbed.experiments.setup import setup
    from testbed.measure.evaluate import first_token_scores

    exp = setup(from_dict(tiny_config(tiny_decoders[family], **LM)))
    tokens, bb = exp.data.test, exp.bb
    options = tokens.choices.options
    assert all(len(o) == 1 for o in options)
    rows = list(range(16))
    bb.model.eval()  # no dropout: the two passes must see one model
    with torch.no_grad():
        logits = bb.model(**tokens.take(rows)).logits
        prompts = [tokens.input_ids[i, : tokens.choices.prompt_lengths[i]].tolist() for i in rows]
        alone = option_logliks(bb.model, prompts, options, bb.tokenizer.pad_token_id, batch_size=16)
    assert torch.allclose(first_token_scores(logits, tokens, rows), alone, atol=1e-4)


def test_validation_is_charged_the_passes_its_options_take(tiny_decoders):
    """One-token label words are scored in the loss's pass; longer ones take a second pass, which
    the cost model charges."""
    import dataclasses

    from testbed.core.plan import Plan
    from testbed.experiments.setup import setup

    seconds = {}
    for name, words in (("one", WORDS), ("several", [f"{w} news today" for w in WORDS])):
        exp = setup(from_dict(tiny_config(tiny_decoders["llama"], **{**LM, "data.label_words": words})))
        device = dataclasses.replace(exp.devices["laptop-0"], val_rows=40)
        seconds[name] = exp.cost.validation_seconds(device, Plan(ranks={0: 4, 1: 4}, validate=True))
        assert exp.cost.eval_passes == (1 if name == "one" else 2)
    assert seconds["several"] == pytest.approx(2 * seconds["one"])
