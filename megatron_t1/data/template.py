"""The prompt template of RL rollouts and evaluation: a question -> chat messages (stdlib only).

``data.prompt_template`` is the user message with ``{question}`` where the question goes (plain text
replacement, so LaTeX braces such as ``\\boxed{}`` need no escaping); ``data.system_prompt`` an
optional system message. The tokenizer's own chat template then renders the messages. The default is
the common instruction of open math-reasoning models (Qwen2.5-Math, DeepSeek-R1 evaluations): the
rule-based reward reads the last ``\\boxed{}`` of a response, so the prompt asks for one. A task of
your own sets its own (the demo's arithmetic task does: :mod:`megatron_t1.data.synthetic`).
"""

from __future__ import annotations

PLACEHOLDER = "{question}"
DEFAULT_PROMPT_TEMPLATE = (
    PLACEHOLDER + "\nPlease reason step by step, and put your final answer within \\boxed{}."
)


def check_template(template: str, where: str = "data.prompt_template") -> str:
    """``template`` itself; a ValueError naming ``where`` unless it holds ``{question}`` exactly once."""
    if not isinstance(template, str) or template.count(PLACEHOLDER) != 1:
        raise ValueError(f"{where} must contain {PLACEHOLDER} exactly once, got {template!r}")
    return template


def prompt_messages(
    question: str, *, template: str = DEFAULT_PROMPT_TEMPLATE, system: str | None = None
) -> list[dict[str, str]]:
    """Chat ``messages`` of one question: an optional system message, then the user message."""
    msgs = [] if system is None else [{"role": "system", "content": system}]
    msgs.append({"role": "user", "content": check_template(template).replace(PLACEHOLDER, question)})
    return msgs


def render_prompts(
    tokenizer, questions: list[str], *, template: str = DEFAULT_PROMPT_TEMPLATE, system: str | None = None
) -> list[str]:
    """The chat-templated prompt text of every question, ending with the assistant turn's opening."""
    return [
        tokenizer.apply_chat_template(
            prompt_messages(q, template=template, system=system), tokenize=False, add_generation_prompt=True
        )
        for q in questions
    ]
