"""Training prompts from a text file, one of the authors' JSON prompt libraries, or a Hub dataset.

* a text file: one prompt per line (blank lines skipped);
* a JSON library as the authors' (``datasets/dreamfusion_415_prompt_library.json``):
  ``{"train": [...], "val": [...], "test": [...]}`` — training reads ``train``; a plain JSON list works too;
* a Hub dataset ``owner/name`` or ``owner/name:file``: the file (a JSON library or a text file) is
  downloaded with huggingface_hub and read as above. The authors' 361k-caption set is
  ``ZhiyuanthePony/TriplaneTrubo`` (spelled so), file ``3DTopia_prompt_library.json``, the default
  for that repository. (Not through the ``datasets`` library: these files are one JSON object
  holding lists, not a table of rows.)
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable

#: The authors' caption library on the Hub and its default file.
AUTHORS_DATASET = "ZhiyuanthePony/TriplaneTrubo"
DEFAULT_FILES = {AUTHORS_DATASET: "3DTopia_prompt_library.json"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(:.+)?$")


#: How a prompt becomes token ids (``token_ids``): the authors' slicing, or the tokenizer's truncation.
TOKEN_MODES = ("slice", "truncate")


def token_ids(tokenizer, prompts: list[str], mode: str = "slice"):
    """[B, L] token ids of ``prompts`` (L = the tokenizer's max length, 77 for CLIP).

    "slice" (the authors'): padded to L, then the first L ids kept, as their prompt processors do
    (``tokens.input_ids[:, :tokenizer.model_max_length]``, stable_diffusion_multi_prompt_processor_
    callable.py:75-82 and dual_stable_diffusion_multi_prompt_processor_callable.py:84-91): a prompt of
    more than L − 2 tokens loses its end-of-text token, which changes its pooled embedding.
    "truncate": the tokenizer's truncation, which keeps the end token.
    """
    import torch

    if mode not in TOKEN_MODES:
        raise ValueError(f"the token mode is one of {', '.join(TOKEN_MODES)}, got {mode!r}")
    length = tokenizer.model_max_length
    if mode == "truncate":
        return tokenizer(prompts, padding="max_length", max_length=length, truncation=True,
                         return_tensors="pt").input_ids
    return torch.tensor([tokenizer(p, padding="max_length", max_length=length).input_ids[:length] for p in prompts])


def parse_prompt_file(path: Path) -> list[str]:
    """Prompts of a text file or a JSON library (see the module docstring), cleaned, blanks dropped."""
    from ..inputs import clean_text

    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
        if isinstance(data, dict):
            if "train" not in data:
                raise ValueError(f"{path}: a prompt library needs a 'train' list (found {', '.join(data) or 'nothing'})")
            data = data["train"]
        if not isinstance(data, list) or not all(isinstance(p, str) for p in data):
            raise ValueError(f"{path}: expected a list of prompts")
        lines = data
    else:
        lines = text.splitlines()
    prompts = [p for p in (clean_text(line)[0] for line in lines) if p]
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts


def read_prompts(source: str | Path, download: Callable[..., str] | None = None) -> list[str]:
    """The training prompts named by ``source``: a local file, or a Hub dataset id (``download``:
    ``huggingface_hub.hf_hub_download`` unless given, e.g. by a test)."""
    path = Path(source).expanduser()
    if path.exists() or not _HUB_ID.match(str(source)):
        if not path.is_file():
            raise ValueError(f"{source}: no such prompt file")
        return parse_prompt_file(path)
    repo_id, _, filename = str(source).partition(":")
    filename = filename or DEFAULT_FILES.get(repo_id)
    if not filename:
        raise ValueError(f"{source}: name the file of the dataset to read, as {repo_id}:FILE (a .json library or .txt)")
    if download is None:
        from huggingface_hub import hf_hub_download as download
    try:
        local = download(repo_id=repo_id, filename=filename, repo_type="dataset")
    except Exception as exc:  # offline, not found, gated: one line for the user
        raise ValueError(f"{repo_id}:{filename}: could not download the prompts ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else 'no details'})") from None
    return parse_prompt_file(Path(local))


__all__ = ["AUTHORS_DATASET", "parse_prompt_file", "read_prompts"]
