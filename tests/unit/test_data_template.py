"""data.template: the question goes where {question} is, braces elsewhere are kept (no str.format)."""

from __future__ import annotations

import pytest

from megatron_t1.data.template import DEFAULT_PROMPT_TEMPLATE, prompt_messages, render_prompts


class _ChatTokenizer:
    """Renders messages the way a chat template would, enough to see what reaches it."""

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        assert tokenize is False and add_generation_prompt is True
        return "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in messages) + "<assistant>"


def test_default_asks_for_a_boxed_answer_and_keeps_latex_braces():
    msgs = prompt_messages("What is {1, 2} union {3}?")
    assert msgs == [
        {
            "role": "user",
            "content": "What is {1, 2} union {3}?\nPlease reason step by step, and put your final answer "
            "within \\boxed{}.",
        }
    ]
    assert "{question}" in DEFAULT_PROMPT_TEMPLATE


def test_template_and_system_message():
    msgs = prompt_messages("2+2", template="Q: {question}\nA \\boxed{} answer, please.", system="Be brief.")
    assert msgs[0] == {"role": "system", "content": "Be brief."}
    assert msgs[1]["content"] == "Q: 2+2\nA \\boxed{} answer, please."
    out = render_prompts(_ChatTokenizer(), ["1+1", "3*3"], template="{question}!")
    assert out == ["<user>1+1!</user><assistant>", "<user>3*3!</user><assistant>"]


@pytest.mark.parametrize("bad", ["no placeholder", "{question} and {question}", "{Question}"])
def test_a_template_without_exactly_one_placeholder_is_refused(bad):
    with pytest.raises(ValueError, match=r"\{question\} exactly once"):
        prompt_messages("x", template=bad)
