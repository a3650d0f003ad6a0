"""Parsing free-form model answers into yes / no, exactly as FORMATS.md prescribes."""

from __future__ import annotations


def parse_mme_answer(text: str) -> str:
    """MME rule: returns ``"yes"``, ``"no"`` or ``"other"`` (always scored wrong).

    Lower-case, strip, drop every "."; "yes"/"no" as is; a single letter y/n maps to yes/no;
    otherwise "yes", then "no", is looked for in the first four characters; else "other".
    """
    answer = text.lower().strip().replace(".", "")
    if answer in ("yes", "no"):
        return answer
    if answer == "y":
        return "yes"
    if answer == "n":
        return "no"
    prefix = answer[:4]
    if "yes" in prefix:
        return "yes"
    if "no" in prefix:
        return "no"
    return "other"


def parse_pope_answer(text: str) -> str:
    """POPE rule (LLaVA's ``eval_pope.py``): returns ``"yes"`` or ``"no"``.

    Keep the text before the first "."; remove commas; split on spaces; if any word is
    ``No``, ``no`` or ``not`` the answer is no, else yes.
    """
    first = text.split(".", 1)[0]
    words = first.replace(",", "").split(" ")
    if "No" in words or "no" in words or "not" in words:
        return "no"
    return "yes"
