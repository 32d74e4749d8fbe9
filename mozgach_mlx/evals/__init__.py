"""Long-context evaluations: passkey retrieval and perplexity by position.

    passkey    a random key hidden at a chosen depth in filler text of a chosen length;
               exact and per-digit accuracy over a lengths x depths grid
    position   token NLL / perplexity per positional bucket of long documents, with a
               sliding window and stride for documents longer than the window
"""

from __future__ import annotations

from .passkey import (
    FILLER,
    PasskeyGrid,
    PasskeyPrompt,
    format_grid,
    make_prompt,
    parse_depths,
    parse_lengths,
    passkey_grid,
    score_prompts,
)
from .position import PositionTable, filler_documents, format_position_table, ppl_by_position, token_nll

__all__ = [
    "FILLER",
    "PasskeyGrid",
    "PasskeyPrompt",
    "PositionTable",
    "filler_documents",
    "format_grid",
    "format_position_table",
    "make_prompt",
    "parse_depths",
    "parse_lengths",
    "passkey_grid",
    "ppl_by_position",
    "score_prompts",
    "token_nll",
]
