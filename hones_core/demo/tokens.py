"""Every answer token: the base and the steered answers token by token, each scored under both rows.

Each answer is teacher-forced under the base row (no plan) and under the steered row (the
request's plan), so every token position carries four log-probabilities: the base answer's
token under base and under steered, and the steered answer's token under both. The first
position where the two answers' tokens differ is where they part; up to it, the steered row
only changes how sure the model is.

Tokens are those the model emits for the shown answer text after the prompt (the answer
re-tokenised, as every teacher-forced score in hones_core is), followed by the end-of-turn
token: "stops here" is a token too. For retrieval the "answer" of a row is its first token,
"Yes" or "No", for the shown candidate (`BaseResult.row`), by the sign of its Yes−No margin.

One batched forward of four rows (2 answers x 2 plans; equal rows are computed once, the
image's vision tower once). `answer_tokens` returns plain data; `tokens_markdown` renders it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..interventions import Plan, intervene
from ..models import VLM
from ..tasks import TASKS
from .compute import BaseResult, SteeredResult
from .request import Request


@dataclass
class AnswerTokens:
    """Both answers, token by token (plain data).

    Attributes:
        answers: {"base": text, "steered": text}.
        ids: answer -> its token ids (the last one the end-of-turn token).
        texts: answer -> each token decoded.
        logprobs: answer -> row ("base", "steered") -> log p of each token, teacher-forced under that row.
        parts_at: the first position where the two answers' token ids differ (None: the same tokens).
        prompt: the prompt the answers follow.
    """
    answers: dict[str, str]
    ids: dict[str, list[int]]
    texts: dict[str, list[str]]
    logprobs: dict[str, dict[str, list[float]]]
    parts_at: int | None
    prompt: str

    def rows(self) -> list[dict]:
        """One dict per position: the base and steered tokens (None past an answer's end) and their 4 log-probs."""
        out = []
        for t in range(max(len(self.ids["base"]), len(self.ids["steered"]))):
            row: dict = {"position": t}
            for answer in ("base", "steered"):
                inside = t < len(self.ids[answer])
                row[f"{answer}_token"] = self.texts[answer][t] if inside else None
                row[f"{answer}_id"] = self.ids[answer][t] if inside else None
                for plan in ("base", "steered"):
                    row[f"{answer}_under_{plan}"] = self.logprobs[answer][plan][t] if inside else None
            out.append(row)
        return out


def shown_answers(request: Request, base: BaseResult, steered: SteeredResult) -> tuple[str, str, str]:
    """(prompt, base answer, steered answer) whose tokens are shown (retrieval: "Yes"/"No" of the shown row)."""
    if TASKS[request.task].scoring == "yes/no":
        row = base.row
        return (request.prompts[row], "Yes" if base.margins[row] > 0 else "No",
                "Yes" if steered.margins[row] > 0 else "No")
    return request.prompts[0], base.answers[0], steered.answers[0]


def first_difference(a: list[int], b: list[int]) -> int | None:
    """The first position where two token lists differ (one ending before the other counts); None if equal."""
    for t, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return t
    return None if len(a) == len(b) else min(len(a), len(b))


@torch.inference_mode()
def answer_tokens(vlm: VLM, request: Request, base: BaseResult, steered: SteeredResult, plan: Plan) -> AnswerTokens:
    """Both answers of a request token by token, each teacher-forced under the base and the steered row.

    Args:
        base, steered: the request's computed results (`DemoService.compute(...)`).
        plan: the steered row's plan (`DemoService.plan(request)`).
    """
    prompt, base_answer, steered_answer = shown_answers(request, base, steered)
    answers = {"base": base_answer, "steered": steered_answer}
    ids = {name: vlm.answer_token_ids(prompt, text, with_stop=True) for name, text in answers.items()}
    order = [("base", "base"), ("base", "steered"), ("steered", "base"), ("steered", "steered")]   # (answer, row)
    encoded = vlm.encode([request.image] * 4, [prompt] * 4, [answers[a] for a, _ in order], with_stop=True)
    plans = [Plan() if row == "base" else plan for _, row in order]
    with intervene(vlm.arch, plans), vlm.sharing(len(plans)):
        logp, _ = vlm.token_logprobs(encoded)                          # [4, n], answers right-aligned
    logprobs: dict[str, dict[str, list[float]]] = {"base": {}, "steered": {}}
    for r, (answer, row) in enumerate(order):
        logprobs[answer][row] = logp[r, logp.shape[1] - len(ids[answer]):].tolist()
    texts = {name: [vlm.tokenizer.decode([t]) for t in token_ids] for name, token_ids in ids.items()}
    return AnswerTokens(answers, ids, texts, logprobs, first_difference(ids["base"], ids["steered"]), prompt)


def _token(text: str | None) -> str:
    if text is None:
        return ""
    shown = repr(text)[1:-1] or "∅"
    return "`" + shown.replace("`", "ˋ").replace("|", "\\|") + "`"


def _lp(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:.3f}" if value == 0 or abs(value) >= 1e-3 else f"{value:.1e}"   # not "-0.000"


def tokens_markdown(tokens: AnswerTokens) -> str:
    """A Markdown table: per position, each answer's token and its log-prob under the base and steered rows.

    The row where the answers part is marked; the last token of each answer is its end-of-turn token.
    """
    where = ("The answers have the same tokens." if tokens.parts_at is None
             else f"The answers part at token {tokens.parts_at} (marked ◀).")
    lines = [f"Each answer teacher-forced under the base and the steered row: log-probability of each token "
             f"(natural log; the last token is the end of the answer). {where}", "",
             "| # | base answer | log p base | log p steered | steered answer | log p base | log p steered | |",
             "|---:|---|---:|---:|---|---:|---:|---|"]
    for row in tokens.rows():
        mark = "◀" if row["position"] == tokens.parts_at else ""
        lines.append(f"| {row['position']} | {_token(row['base_token'])} | {_lp(row['base_under_base'])} | "
                     f"{_lp(row['base_under_steered'])} | {_token(row['steered_token'])} | "
                     f"{_lp(row['steered_under_base'])} | {_lp(row['steered_under_steered'])} | {mark} |")
    for name in ("base", "steered"):
        total = {row: sum(tokens.logprobs[name][row]) for row in ("base", "steered")}
        lines.append("")
        lines.append(f"{name.title()} answer, whole sequence: log p {total['base']:.3f} under base, "
                     f"{total['steered']:.3f} under steered.")
    return "\n".join(lines) + "\n"


def tokens_dict(tokens: AnswerTokens) -> dict:
    """JSON-able data for the results file or an API client."""
    return {"prompt": tokens.prompt, "answers": tokens.answers, "parts_at": tokens.parts_at, "rows": tokens.rows()}


__all__ = ["AnswerTokens", "shown_answers", "first_difference", "answer_tokens", "tokens_markdown", "tokens_dict"]
