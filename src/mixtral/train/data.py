"""Training data: encode chat conversations and plain text, pack them into fixed-length windows.

Inputs (one or more files):
- ``.jsonl``: one JSON object per line, either ``{"messages": [...], "tools": [...]}`` (a chat in the
  OpenAI/Mistral message format, encoded with mistral-common's instruct template for the model's tokenizer)
  or ``{"text": "..."}`` (a plain document, encoded as ``<s> text </s>``);
- ``.txt``: one plain document per file;
- ``.safetensors``: a dataset this module already encoded and packed (``save_packed``), so a machine without
  mistral-common (the GPU box) can train on it.

Loss masks: in a chat only the assistant's tokens are trained, i.e. everything after ``[/INST]`` or
``[/TOOL_RESULTS]`` up to and including ``</s>`` (answers and ``[TOOL_CALLS] ...``); prompts, tool
definitions and tool results are context. In plain text every token after ``<s>`` is trained.

Packing: documents are laid into windows of ``seq_len`` tokens in order; a document that does not fit the
rest of the current window starts a new one (the tail is padding), and a document longer than a window
is cut into window-sized pieces. Each position carries a code: 0 = padding, 1 = context, 2 = trained target.
Documents sharing a window attend to each other (plain causal attention, as in most pre-training); every
document starts with ``<s>``, whose prediction is never trained, so the model learns where one begins.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

PAD, CONTEXT, TARGET = 0, 1, 2
PAD_ID = 0  # <unk>: never a target; its rows are masked out of every loss
# v3 control ids (see MIXTRAL_NOTES): the assistant speaks after [/INST] and after [/TOOL_RESULTS].
INST, END_INST, TOOL_CALLS, AVAILABLE_TOOLS, END_AVAILABLE_TOOLS, TOOL_RESULTS, END_TOOL_RESULTS = 3, 4, 5, 6, 7, 8, 9


@dataclass
class PackedDataset:
    """Windows of token ids [N, T] (int64) and their position codes [N, T] (uint8: PAD/CONTEXT/TARGET)."""

    tokens: torch.Tensor
    codes: torch.Tensor

    def __post_init__(self) -> None:
        if self.tokens.shape != self.codes.shape or self.tokens.dim() != 2:
            raise ValueError(f"tokens {tuple(self.tokens.shape)} and codes {tuple(self.codes.shape)} must both be "
                             "[num_windows, seq_len]")

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def seq_len(self) -> int:
        return self.tokens.shape[1]

    def split(self, eval_fraction: float, seed: int = 0) -> tuple[PackedDataset, PackedDataset]:
        """(train, held-out) by a seeded shuffle of windows; the held-out part has at least one window."""
        if not 0 <= eval_fraction < 1:
            raise ValueError(f"eval fraction must be in [0, 1), got {eval_fraction}")
        n_eval = max(1, round(len(self) * eval_fraction)) if eval_fraction > 0 else 0
        if n_eval >= len(self):
            raise ValueError(f"{len(self)} windows are too few to hold out {eval_fraction:.0%} for evaluation")
        perm = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))
        tr, ev = perm[n_eval:].sort().values, perm[:n_eval].sort().values
        return (PackedDataset(self.tokens[tr], self.codes[tr]), PackedDataset(self.tokens[ev], self.codes[ev]))

    def stats(self) -> dict[str, int]:
        return {"windows": len(self), "seq_len": self.seq_len, "tokens": int((self.codes != PAD).sum()),
                "targets": int((self.codes == TARGET).sum())}


def chat_target_codes(tokens: Sequence[int], eos_id: int,
                      turn_ends: Sequence[Sequence[int]] = ((END_INST,), (END_TOOL_RESULTS,)),
                      turn_starts: Sequence[Sequence[int]] = ((INST,), (AVAILABLE_TOOLS,), (TOOL_RESULTS,)),
                      ) -> list[int]:
    """Position codes for an encoded chat: TARGET from just after a turn end (``[/INST]``, ``[/TOOL_RESULTS]``)
    up to and including ``</s>``. Markers are token sequences: single control ids in v3, the text pieces of
    ``[/INST]`` in v1 (where the template is plain text)."""

    def ends_with(i: int, markers: Sequence[Sequence[int]]) -> bool:
        return any(len(m) and i + 1 >= len(m) and list(tokens[i + 1 - len(m):i + 1]) == list(m) for m in markers)

    codes, speaking = [], False
    for i, t in enumerate(tokens):
        codes.append(TARGET if speaking else CONTEXT)
        if speaking and ends_with(i, turn_starts):
            # A turn that ended without </s> (not produced by mistral-common): un-train the marker.
            speaking = False
            for m in turn_starts:
                if ends_with(i, [m]):
                    codes[i + 1 - len(m):] = [CONTEXT] * len(m)
        if speaking and t == eos_id:
            speaking = False
        elif ends_with(i, turn_ends):
            speaking = True
    return codes


class Encoder:
    """Turns chat records and text into (tokens, codes) with a mistral-common tokenizer (v1 or v3)."""

    def __init__(self, tokenizer: str | Path = "v3") -> None:
        from mistral_common.protocol.instruct.validator import ValidationMode
        from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

        if str(tokenizer) in ("v1", "v3"):
            mt = getattr(MistralTokenizer, str(tokenizer))()
        else:
            from mixtral.tokenizer import Tokenizer

            # A file: read as the serving side reads it, so a bare ``tokenizer.model`` (as Hub repos ship it)
            # is v3 when it has 32768 ids; mistral-common's own from_file would take it for v1.
            mt = Tokenizer.from_file(tokenizer).mistral_tokenizer
        # Training requests end with the assistant's turn: finetuning mode validates exactly that.
        mt._chat_completion_request_validator._mode = ValidationMode.finetuning
        self.mistral = mt
        self.sp = mt.instruct_tokenizer.tokenizer
        self.bos_id, self.eos_id = self.sp.bos_id, self.sp.eos_id
        # v3 has control tokens for the template; v1 spells "[INST]"/"[/INST]" as text pieces.
        if self._control("[/INST]") is not None:
            self.turn_ends: tuple[tuple[int, ...], ...] = ((END_INST,), (END_TOOL_RESULTS,))
            self.turn_starts: tuple[tuple[int, ...], ...] = ((INST,), (AVAILABLE_TOOLS,), (TOOL_RESULTS,))
        else:
            self.turn_ends = (tuple(self.sp.encode("[/INST]", bos=False, eos=False)),)
            self.turn_starts = (tuple(self.sp.encode("[INST]", bos=False, eos=False)),)

    def _control(self, piece: str) -> int | None:
        """The control id of ``piece``, or None when this tokenizer has none (v1)."""
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # get_control_token's rename in newer versions
            try:
                tid = int(self.sp.get_control_token(piece))
            except Exception:
                return None
        return tid if tid > 2 else None  # unknown pieces come back as <unk> (0)

    def encode_text(self, text: str) -> tuple[list[int], list[int]]:
        ids = self.sp.encode(text, bos=True, eos=True)
        return ids, [CONTEXT] + [TARGET] * (len(ids) - 1)

    def encode_chat(self, record: dict[str, Any]) -> tuple[list[int], list[int]]:
        from mistral_common.protocol.instruct.request import ChatCompletionRequest

        request = ChatCompletionRequest(messages=_normalise_messages(record["messages"]),
                                        tools=record.get("tools") or None)
        ids = self.mistral.encode_chat_completion(request).tokens
        return ids, chat_target_codes(ids, self.eos_id, self.turn_ends, self.turn_starts)


def _normalise_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Accept tool-call arguments as objects as well as JSON strings (mistral-common wants strings), and
    OpenAI-style tool-call ids (``call_...``): they are mapped to Mistral's 9-character ids exactly as the
    server and ``Tokenizer.encode_chat`` map them, so a model is trained on the prompts it will be served."""
    from mixtral.tokenizer import normalize_tool_call_id

    out = []
    for m in messages:
        m = dict(m)
        if m.get("tool_calls"):
            calls = []
            for c in m["tool_calls"]:
                fn = dict(c["function"])
                if not isinstance(fn.get("arguments"), str):
                    fn["arguments"] = json.dumps(fn.get("arguments", {}), ensure_ascii=False)
                call = {**c, "function": fn}
                if isinstance(call.get("id"), str):
                    call["id"] = normalize_tool_call_id(call["id"])
                calls.append(call)
            m["tool_calls"] = calls
        if isinstance(m.get("tool_call_id"), str):
            m["tool_call_id"] = normalize_tool_call_id(m["tool_call_id"])
        out.append(m)
    return out


def read_documents(paths: Iterable[str | Path], encoder: Encoder) -> list[tuple[list[int], list[int]]]:
    """Encode every record of every file, in file order."""
    docs = []
    for path in map(Path, paths):
        if not path.is_file():
            raise FileNotFoundError(f"training data file {path} not found")
        if path.suffix == ".txt":
            docs.append(encoder.encode_text(path.read_text(encoding="utf-8")))
            continue
        if path.suffix != ".jsonl":
            raise ValueError(f"{path}: training data must be .jsonl, .txt or a packed .safetensors")
        with path.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    if "messages" in record:
                        docs.append(encoder.encode_chat(record))
                    elif "text" in record:
                        docs.append(encoder.encode_text(record["text"]))
                    else:
                        raise ValueError("record has neither 'messages' nor 'text'")
                except Exception as exc:
                    raise ValueError(f"{path}:{lineno}: cannot encode this record: {exc}") from exc
    return docs


def pack(docs: Sequence[tuple[list[int], list[int]]], seq_len: int) -> PackedDataset:
    """Lay documents into [N, seq_len] windows (see the module docstring)."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    rows_t: list[list[int]] = []
    rows_c: list[list[int]] = []
    cur_t: list[int] = []
    cur_c: list[int] = []

    def flush() -> None:
        if cur_t:
            pad = seq_len - len(cur_t)
            rows_t.append(cur_t + [PAD_ID] * pad)
            rows_c.append(cur_c + [PAD] * pad)
            cur_t.clear()
            cur_c.clear()

    for ids, codes in docs:
        if len(cur_t) + len(ids) > seq_len:
            flush()
        for start in range(0, len(ids), seq_len):
            piece_t, piece_c = ids[start:start + seq_len], codes[start:start + seq_len]
            if start and piece_c:
                piece_c = [CONTEXT, *piece_c[1:]]  # the first token of a cut-off piece has no left context
            cur_t.extend(piece_t)
            cur_c.extend(piece_c)
            if len(cur_t) == seq_len:
                flush()
    flush()
    if not rows_t:
        raise ValueError("no training data: every input file was empty")
    return PackedDataset(torch.tensor(rows_t, dtype=torch.int64), torch.tensor(rows_c, dtype=torch.uint8))


def save_packed(ds: PackedDataset, path: str | Path) -> None:
    """Store tokens as uint16 when the vocabulary allows (half the size), codes as uint8."""
    small = int(ds.tokens.max()) < 2**16
    tokens = ds.tokens.to(torch.uint16) if small else ds.tokens.to(torch.int32)
    save_file({"tokens": tokens.contiguous(), "codes": ds.codes.contiguous()}, str(path),
              metadata={"format": "mixtral-packed", "seq_len": str(ds.seq_len)})


def load_packed(path: str | Path) -> PackedDataset:
    t = load_file(str(path))
    if set(t) != {"tokens", "codes"}:
        raise ValueError(f"{path} is not a packed dataset (tensors {sorted(t)}); write one with --save-dataset")
    return PackedDataset(t["tokens"].to(torch.int64), t["codes"].to(torch.uint8))


def build_dataset(paths: Sequence[str | Path], seq_len: int, tokenizer: str | Path = "v3",
                  vocab_size: int | None = None) -> PackedDataset:
    """Files -> one PackedDataset. Packed .safetensors inputs are concatenated as they are (same seq_len).

    ``vocab_size`` (the model's): refuse a tokenizer with more ids, or data holding an id the model lacks. A v3
    tokenizer on a v1 model would otherwise train on ids that mean other words (v3 ids are v1's + 768).
    """
    packed = [load_packed(p) for p in paths if Path(p).suffix == ".safetensors"]
    raw = [p for p in paths if Path(p).suffix != ".safetensors"]
    parts = list(packed)
    if raw:
        encoder = Encoder(tokenizer)
        if vocab_size is not None and encoder.sp.n_words > vocab_size:
            raise ValueError(f"tokenizer {tokenizer} has {encoder.sp.n_words} ids but the model's vocabulary has "
                             f"{vocab_size}; use the model's own tokenizer (--tokenizer)")
        parts.append(pack(read_documents(raw, encoder), seq_len))
    if not parts:
        raise ValueError("no training data files given")
    lens = {p.seq_len for p in parts}
    if len(lens) != 1:
        raise ValueError(f"packed datasets have different window lengths {sorted(lens)}; use one --seq-len")
    data = PackedDataset(torch.cat([p.tokens for p in parts]), torch.cat([p.codes for p in parts]))
    if vocab_size is not None and len(data) and int(data.tokens.max()) >= vocab_size:
        raise ValueError(f"the training data holds token id {int(data.tokens.max())}, outside the model's vocabulary "
                         f"of {vocab_size}; was it encoded with another model's tokenizer?")
    return data
