"""Action C: forward the request with the most relevant cached Q&A as context.

The cached pair goes into one system message placed right before the user's last turn (after the
application's own system prompt and history, so it neither overrides the app's instructions nor reads
as something the user said). It is labelled as an earlier answer to a *similar* question and the model
is told to ignore it when it does not apply: when the cached entry is relevant the model can reuse
it (consistent, shorter answers); when it is a near miss, the instruction keeps it from answering the
wrong question. The cached answer is cut to a token budget (``VELO_AUGMENT_MAX_TOKENS``, estimated at
4 characters per token, cut at a word boundary) so C never blows up the prompt.

C's answer is cached like B's, under the user's own question: it is the upstream's answer to that
question (the context only helped write it).
"""

from __future__ import annotations

from typing import Any

CHARS_PER_TOKEN = 4

TEMPLATE = (
    "Context from the cache: a similar question was answered earlier. Use the earlier answer only if it "
    "also answers the user's current question; if it does not apply, ignore it and answer normally. "
    "Do not mention this context.\n\n"
    "Earlier question: {question}\n"
    "Earlier answer: {answer}"
)


def truncate_to_tokens(text: str, max_tokens: int) -> str:
    limit = max_tokens * CHARS_PER_TOKEN
    if len(text) <= limit:
        return text
    cut = text[:limit]
    space = cut.rfind(" ")
    return (cut[:space] if space > limit // 2 else cut).rstrip() + " …"


def augmented_payload(payload: dict[str, Any], *, question: str, answer: str, max_tokens: int) -> dict[str, Any]:
    """A copy of the request with the cached Q&A inserted before the last user turn."""
    context = TEMPLATE.format(question=truncate_to_tokens(question, max_tokens // 4),
                              answer=truncate_to_tokens(answer, max_tokens))
    messages = list(payload["messages"])
    messages.insert(len(messages) - 1, {"role": "system", "content": context})
    return {**payload, "messages": messages}
