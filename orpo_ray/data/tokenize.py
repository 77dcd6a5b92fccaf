"""Preference pair -> token ids, under one stated truncation policy.

Truncation policy (the only one in the project; Ray Data and the in-process path both call this):
  1. prompt_ids = [BOS] + prompt tokens (BOS only if the tokenizer has one); each response = its tokens + [EOS].
  2. If len(prompt) + max(len(chosen), len(rejected)) > max_length and the prompt is longer than
     max_prompt_length, keep the END of the prompt (the most recent turns carry the question being
     answered): left-truncate it to max_prompt_length tokens, BOS staying first.
  3. Right-truncate each response to max_length - len(prompt) tokens.
Because max_prompt_length < max_length (the config enforces it, `tokenize_pair` re-checks), step 3 always
leaves at least one response token, so the length-normalised log-probability is never 0/0 - the case where
TRL's ORPOTrainer yields NaN when a prompt fills max_length.
`prompt_tokens_cut` / `response_tokens_cut` count what steps 2 and 3 removed (responses: chosen + rejected).

Prompt and responses are encoded separately (no merge across the boundary), so the response tokens are
exactly the tokens the model is scored on. A chat template that itself emits the BOS text gets no second BOS.
A prompt must give at least one token (BOS counts): the first response token is scored from the logits of the
token before it, so with an empty prompt and no BOS there is nothing to score it from.

Per row, `tokenize_row` turns any failure - a chat template that raises, a template that does not extend the
prompt, a tokenizer error, an empty prompt without BOS - into a `Quarantined` with the reason, so one row
never ends a run; both data paths call it.

Pure module: tokenizer objects only; no ray, no deepspeed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from orpo_ray.data.policy import row_flags
from orpo_ray.data.records import PreferencePair, Quarantined, excerpt, row_to_pair
from orpo_ray.embedded_tokenizer import CHAT_TEMPLATE as HH_TEMPLATE

TOKEN_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids", "prompt_tokens_cut", "response_tokens_cut")
FLAG_COLUMNS = ("identical", "truncated")  # policy.row_flags, computed where the tokens are
QUARANTINE_COLUMNS = ("reason", "excerpt")  # tokenize_batch: a non-empty reason marks a quarantined row
EMPTY_PROMPT = "empty prompt and the tokenizer has no BOS token: the first response token has nothing to be scored from"


# data.chat_template built-ins: the project's HH-style template, and ChatML (Qwen's format).
BUILTIN_CHAT_TEMPLATES = {
    "hh": HH_TEMPLATE,
    "chatml": ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
               "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
               "{% endif %}"),
}


def use_chat_template(tokenizer: Any, setting: str | None) -> Any:
    """Apply ``data.chat_template`` (a built-in name or a Jinja file) to `tokenizer`; None keeps the model
    directory's own template. Returns the tokenizer (changed in place, so an exported model carries it)."""
    if setting is None:
        return tokenizer
    if setting in BUILTIN_CHAT_TEMPLATES:
        tokenizer.chat_template = BUILTIN_CHAT_TEMPLATES[setting]
    elif Path(setting).is_file():
        tokenizer.chat_template = Path(setting).read_text()
    else:
        raise ValueError(f"data.chat_template={setting!r} is neither a file nor a built-in template "
                         f"({', '.join(BUILTIN_CHAT_TEMPLATES)})")
    return tokenizer


def render_pair(pair: PreferencePair, tokenizer: Any) -> tuple[str, str, str]:
    """Texts of (prompt, chosen, rejected); conversational pairs go through the tokenizer's chat template
    (the model directory's own, or ``data.chat_template`` via `use_chat_template`)."""
    if isinstance(pair.chosen, str):
        return pair.prompt, pair.chosen, pair.rejected
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            f"{pair.source} row {pair.row}: conversational data is rendered with the model's chat template, but "
            f"the tokenizer at {getattr(tokenizer, 'name_or_path', '') or '(built in)'} has none; set "
            f"data.chat_template to a Jinja file or a built-in name ({', '.join(BUILTIN_CHAT_TEMPLATES)})")
    prompt_text = tokenizer.apply_chat_template(pair.prompt, tokenize=False, add_generation_prompt=True)
    responses = []
    for reply in (pair.chosen, pair.rejected):
        full = tokenizer.apply_chat_template(pair.prompt + reply, tokenize=False)
        if not full.startswith(prompt_text):
            raise ValueError("the chat template does not render the prompt as a prefix of prompt + response, so the "
                             "response cannot be separated")
        responses.append(full[len(prompt_text):])
    return prompt_text, responses[0], responses[1]


def tokenize_pair(prompt: str, chosen: str, rejected: str, tokenizer: Any, max_length: int,
                  max_prompt_length: int) -> dict:
    """The tokenized row of docs/architecture.md, truncated by the policy in the module docstring."""
    if not 0 < max_prompt_length < max_length:
        raise ValueError(f"need 0 < max_prompt_length ({max_prompt_length}) < max_length ({max_length})")
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id: every response must end with EOS")
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    prompt_ids = encode(prompt)
    if bos is not None and prompt_ids[:1] != [bos]:  # a chat template may already have rendered BOS
        prompt_ids = [bos] + prompt_ids
    if not prompt_ids:
        raise ValueError(EMPTY_PROMPT)
    chosen_ids, rejected_ids = encode(chosen) + [eos], encode(rejected) + [eos]

    prompt_cut = 0
    if len(prompt_ids) + max(len(chosen_ids), len(rejected_ids)) > max_length and len(prompt_ids) > max_prompt_length:
        prompt_cut = len(prompt_ids) - max_prompt_length
        if bos is not None:  # keep BOS first, then the last max_prompt_length - 1 prompt tokens
            prompt_ids = [bos] + prompt_ids[1 + prompt_cut:]
        else:
            prompt_ids = prompt_ids[prompt_cut:]
    budget = max_length - len(prompt_ids)
    response_cut = max(0, len(chosen_ids) - budget) + max(0, len(rejected_ids) - budget)
    return {
        "prompt_ids": prompt_ids,
        "chosen_ids": chosen_ids[:budget],
        "rejected_ids": rejected_ids[:budget],
        "prompt_tokens_cut": prompt_cut,
        "response_tokens_cut": response_cut,
    }


def tokenize_row(pair: PreferencePair, tokenizer: Any, max_length: int, max_prompt_length: int
                 ) -> dict | Quarantined:
    """One pair -> its tokenized row, with its (source, row) and the flags `policy` reads; or, if anything about
    this row fails, a Quarantined naming the error (configuration errors fail every row the same way, and a run
    with no pair left stops with the first reason)."""
    try:
        tokens = tokenize_pair(*render_pair(pair, tokenizer), tokenizer, max_length, max_prompt_length)
    except Exception as e:  # noqa: BLE001 - one row's failure, whatever it is, must not end the run
        reason = str(e) if str(e) == EMPTY_PROMPT else f"tokenization failed: {type(e).__name__}: {e}"
        return Quarantined(pair.source, pair.row, reason,
                           excerpt({"prompt": pair.prompt, "chosen": pair.chosen, "rejected": pair.rejected}))
    return {**tokens, **row_flags(tokens), "source": pair.source, "row": pair.row}


def tokenize_batch(batch: Mapping[str, Sequence], tokenizer: Any, max_length: int, max_prompt_length: int,
                   keep: Sequence[str] = ()) -> dict[str, list]:
    """Ray Data `map_batches` body: columns of `data.pair_to_row` -> columns of the tokenized row.

    Columns named in `keep` (e.g. "source", "row") are passed through unchanged, so callers can carry
    bookkeeping next to the token ids; FLAG_COLUMNS carry what `policy` needs to know of each row. A row
    `tokenize_row` quarantines has its reason and excerpt in QUARANTINE_COLUMNS and placeholder token columns
    ([0] ids: one dtype in every block, even a block of only such rows); the policy never keeps it.
    """
    out: dict[str, list] = {k: [] for k in (*TOKEN_COLUMNS, *FLAG_COLUMNS, *QUARANTINE_COLUMNS, *keep)}
    for i in range(len(batch["prompt"])):
        row = tokenize_row(row_to_pair({k: batch[k][i] for k in batch}), tokenizer, max_length, max_prompt_length)
        if isinstance(row, Quarantined):
            row = {"prompt_ids": [0], "chosen_ids": [0], "rejected_ids": [0], "prompt_tokens_cut": 0,
                   "response_tokens_cut": 0, "identical": False, "truncated": False, "reason": row.reason,
                   "excerpt": row.excerpt}
        else:
            row |= {"reason": "", "excerpt": ""}
        for k in (*TOKEN_COLUMNS, *FLAG_COLUMNS, *QUARANTINE_COLUMNS):
            out[k].append(row[k])
        for k in keep:
            out[k].append(batch[k][i])
    return out
