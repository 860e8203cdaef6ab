"""Inference-scaling sweep: truncation at N tokens keeps exactly N thinking tokens, the summarising
prompt has the SFT's truncated-thinking layout, and the table follows from the summaries."""

from __future__ import annotations

import random

import pytest

from megatron_t1.data.synthetic import (
    THINK_CLOSE,
    close_thinking,
    full_response,
    make_problems,
    prompt_messages,
)
from megatron_t1.eval.benchmark import chat_prompt_ids
from megatron_t1.eval.loaders import EvalProblem
from megatron_t1.eval.scaling import Summariser, budget_sweep, summary_prompt, thinking_length
from megatron_t1.rollout.engine import Completion, PromptCompletions, SamplingParams

THRESHOLD = 16  # the fake summariser answers correctly iff it saw at least this many thinking tokens


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from megatron_t1.data.synthetic import make_sft_examples
    from megatron_t1.data.tokenizer import chat_corpus, train_tokenizer

    return train_tokenizer(chat_corpus(make_sft_examples(300, seed=5)), 400)


@pytest.fixture(scope="module")
def scorer():
    from megatron_t1.reward import RewardConfig, RewardScorer

    with RewardScorer(RewardConfig(num_workers=0)) as s:
        yield s


def _completion(tok, ids, finish):
    return Completion(
        token_ids=list(ids),
        text=tok.decode(ids, skip_special_tokens=True),
        logprobs=[0.0] * len(ids),
        finish_reason=finish,
    )


class FakeSummariser:
    """Records every prompt; answers the gold iff the prompt held >= THRESHOLD thinking tokens."""

    def __init__(self, tok, layout):
        self.tok = tok
        self.layout = layout  # tuple(prompt ids) -> (prompt length, thinking ids, gold)
        self.prompts: list[list[int]] = []
        self.calls = 0

    def generate(self, prompts, n, params):
        assert n == 1 and params.temperature == 0.0
        self.calls += 1
        out = []
        for p in prompts:
            self.prompts.append(list(p))
            m = self.kept(p)
            gold = self.layout_for(p)[2]
            text = f"The answer is \\boxed{{{gold if m >= THRESHOLD else 'nope'}}}."
            ids = self.tok(text, add_special_tokens=False)["input_ids"]
            out.append(PromptCompletions(list(p), [_completion(self.tok, ids, "stop")]))
        return out

    def layout_for(self, p):
        for head, v in self.layout.items():
            if tuple(p[: len(head)]) == head:
                return v
        raise AssertionError("summariser prompt does not start with a policy prompt")

    def kept(self, p) -> int:
        """Thinking tokens kept: the longest prefix of the sample's ids right after the prompt."""
        n_prompt, ids, _ = self.layout_for(p)
        body = p[n_prompt:]
        m = 0
        while m < len(body) and m < len(ids) and body[m] == ids[m]:
            m += 1
        return m

    def close(self):
        pass


def _setup(tok):
    problems_raw = make_problems(2, seed=11, split="heldout", n_operands=(4, 4), digits=(2, 2))
    problems = [EvalProblem(f"p{i}", "arith", p.question, p.answer) for i, p in enumerate(problems_raw)]
    prompts = chat_prompt_ids(tok, problems)
    comps, layout = [], {}
    close_id = tok.convert_tokens_to_ids(THINK_CLOSE)
    for pi, (p, raw) in enumerate(zip(problems, problems_raw)):
        full = tok(full_response(raw, random.Random(pi), error_rate=0.0), add_special_tokens=False)[
            "input_ids"
        ]
        t = full.index(close_id)
        assert t > 2 * THRESHOLD
        samples = [
            _completion(tok, full, "stop"),  # A: closed at T
            _completion(tok, full[: t - 3], "length"),  # B: still thinking at the generation limit
            _completion(tok, full[:4], "stop"),  # C: EOS after 4 tokens without closing
        ]
        comps.append(PromptCompletions(prompts[pi], samples))
        layout[tuple(prompts[pi])] = (len(prompts[pi]), full, p.answer)
    return problems, prompts, comps, layout


def test_thinking_length_single_and_multi_token_marker(tok):
    ids = tok(
        "<think>\n12 + 5 = 17\ncheck: 17 - 5 = 12, correct\n</think>\nThe answer is \\boxed{17}.",
        add_special_tokens=False,
    )["input_ids"]
    t, closed = thinking_length(ids, tok)
    assert closed and ids[t] == tok.convert_tokens_to_ids(THINK_CLOSE)
    assert THINK_CLOSE not in tok.decode(ids[:t]) and tok.decode(ids[: t + 1]).endswith(THINK_CLOSE)
    assert thinking_length(ids[:t], tok) == (t, False)
    # a marker of several tokens: the largest prefix whose text ends at or before the marker
    marker = "check: 17"
    assert len(tok(marker, add_special_tokens=False)["input_ids"]) > 1
    m, found = thinking_length(ids, tok, marker=marker)
    cut = tok.decode(ids).find(marker)
    assert found and len(tok.decode(ids[:m])) <= cut < len(tok.decode(ids[: m + 1]))


def test_truncation_keeps_exactly_n_thinking_tokens_and_sft_layout(tok, scorer):
    problems, prompts, comps, layout = _setup(tok)
    fake = FakeSummariser(tok, layout)
    t_a = [thinking_length(pc.completions[0].token_ids, tok)[0] for pc in comps]
    budgets = [4, THRESHOLD, max(t_a), 1000]
    rows, records = budget_sweep(
        problems,
        comps,
        tok,
        budgets,
        scorer,
        Summariser(fake, tok),
        summary_params=SamplingParams(temperature=0.0, max_tokens=16),
        checkpoint="ck",
    )
    # every summarising prompt: policy prompt + the sample's first m tokens + close_thinking's text
    for p in fake.prompts:
        n_prompt, ids, _ = fake.layout_for(p)
        m = fake.kept(p)
        assert p[n_prompt : n_prompt + m] == ids[:m]
        text = tok.decode(p)
        partial = tok.decode(ids[:m])
        assert text == tok.decode(p[:n_prompt]) + close_thinking(partial)  # SFT truncated-example layout
        assert text.count(THINK_CLOSE) == 1
    kept = sorted(fake.kept(p) for p in fake.prompts)
    # budget 4: A and B of both problems cut at 4; budget 16: at 16; budget max(T): B at its
    # length T-3 (A of the shorter problem stands); budget 1000: nothing new (B's cut is cached)
    expected = sorted(
        [4] * 4 + [THRESHOLD] * 4 + [t - 3 for t in t_a] + [max(t_a)] * sum(t > max(t_a) for t in t_a)
    )
    assert kept == expected
    assert fake.calls == 3
    by_budget = {r["budget"]: r for r in rows}
    assert sorted(by_budget) == sorted(budgets)
    # accuracy: C never answers; A and B answer iff >= THRESHOLD tokens kept (or A stands: correct)
    assert by_budget[4]["accuracy"] == 0.0
    for b in budgets[1:]:
        assert by_budget[b]["accuracy"] == pytest.approx(2 / 3)
        assert by_budget[b]["stderr"] == 0.0
    assert by_budget[4]["summarised"] == pytest.approx(4 / 6)  # C (4 tokens, EOS) stands at N = 4
    assert by_budget[1000]["summarised"] == pytest.approx(2 / 6)  # only the over-long B samples
    # tokens used at N = 16: A, B: 16 + closing text + answer; C: its 4 tokens
    recs16 = [r for r in records if r["budget"] == THRESHOLD]
    for r in recs16:
        if r["summarised"]:
            assert r["thinking_tokens"] == THRESHOLD
            n_answer = len(tok(r["response"], add_special_tokens=False)["input_ids"])
            full = layout[tuple(prompts[int(r["problem_id"][1:])])][1]
            partial = tok.decode(full[:THRESHOLD])
            closing = close_thinking(partial)[len(partial) :]  # "\n</think>\n" or "</think>\n"
            assert (
                r["tokens"] == THRESHOLD + len(tok(closing, add_special_tokens=False)["input_ids"]) + n_answer
            )
        else:
            assert r["tokens"] == 4 and r["sample"] == 2
    mean16 = sum(r["tokens"] for r in recs16) / len(recs16)
    assert by_budget[THRESHOLD]["mean_tokens"] == pytest.approx(mean16)
    # the full-budget sample A that stands keeps its own text and is scored from it
    stand = [r for r in records if r["budget"] == 1000 and r["sample"] == 0]
    assert all(not r["summarised"] and r["correct"] == 1.0 and r["response"] is None for r in stand)
    assert all(r["extracted"] == r["gold"] for r in stand)


def test_separate_summariser_gets_text_in_its_own_chat_template(tok):
    problems, prompts, comps, _ = _setup(tok)
    ids = comps[0].completions[0].token_ids[:9]
    s = Summariser(engine=None, tokenizer=tok, same_tokenizer=False, system="Be brief.")
    got, head, n_close = summary_prompt(s, problems[0], prompts[0], ids, tok)
    want = tok.apply_chat_template(
        prompt_messages(problems[0].question, "Be brief."), tokenize=False, add_generation_prompt=True
    ) + close_thinking(tok.decode(ids))
    assert tok.decode(got) == want
    assert head == close_thinking(tok.decode(ids)) and n_close >= 1


def test_bad_budgets(tok, scorer):
    problems, _, comps, layout = _setup(tok)
    with pytest.raises(ValueError, match="budgets"):
        budget_sweep(
            problems,
            comps,
            tok,
            [0, 4],
            scorer,
            Summariser(FakeSummariser(tok, layout), tok),
            summary_params=SamplingParams(temperature=0.0),
            checkpoint="c",
        )
