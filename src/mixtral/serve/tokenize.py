"""vLLM's tokenizer endpoints: ``POST /tokenize``, ``POST /detokenize``, ``GET /tokenizer_info``.

lm-evaluation-harness's ``tokenizer_backend=remote`` (and other vLLM clients) use exactly these three to count and
prepare tokens for ``/v1/completions``. Text is encoded with the model's SentencePiece tokenizer; the text of a
control token (``<s>``, ``</s>``, ``[INST]``...) becomes that token, as Hugging Face tokenizers do (lm-eval finds
the EOS and BOS ids by tokenizing the strings ``/tokenizer_info`` names). ``add_special_tokens`` puts ``<s>`` first.
Messages are encoded exactly as a chat completion would encode them. ``/detokenize`` renders control tokens as
their text, so ``/tokenize`` of it gives the ids back.
"""

from __future__ import annotations

import re
from typing import Any

from mixtral.serve.chat import encode_messages, messages_for_tokenizer
from mixtral.serve.errors import APIError
from mixtral.serve.params import check_token_ids
from mixtral.serve.protocol import AssistantMessage, DetokenizeRequest, TokenizeChatRequest, TokenizeRequest
from mixtral.serve.responses import DetokenizeResponse, TokenizeResponse, TokenizerInfoResponse
from mixtral.serve.state import ServerState


class TokenizerEndpoints:
    """The three handlers over one server's tokenizer (the control-token table is built once)."""

    def __init__(self, state: ServerState) -> None:
        self.state = state
        tok = state.tokenizer
        self._controls = {tok.piece_texts[i]: i for i in range(tok.vocab_size) if tok.is_control(i)}
        # Longest first, so "[/INST]" is not read as "[" + ... ; None when the vocabulary has no control text.
        names = sorted(self._controls, key=len, reverse=True)
        self._pattern = re.compile("|".join(re.escape(n) for n in names)) if names else None

    def encode_text(self, text: str, add_special_tokens: bool) -> list[int]:
        tok = self.state.tokenizer
        ids = [tok.bos_id] if add_special_tokens else []
        pos = 0
        for match in self._pattern.finditer(text) if self._pattern is not None else ():
            if match.start() > pos:
                ids += tok.encode(text[pos:match.start()], bos=False)
            ids.append(self._controls[match.group()])
            pos = match.end()
        if pos < len(text):
            ids += tok.encode(text[pos:], bos=False)
        return ids

    def _resolve(self, model: str | None) -> None:
        if model is not None:
            self.state.model.resolve(model)

    def tokenize(self, req: TokenizeRequest) -> TokenizeResponse:
        self._resolve(req.model)
        if isinstance(req, TokenizeChatRequest):
            last_is_assistant = isinstance(req.messages[-1], AssistantMessage)
            continue_last = last_is_assistant and (bool(req.continue_final_message) or not req.add_generation_prompt
                                                   or bool(req.messages[-1].prefix))
            if (req.continue_final_message or not req.add_generation_prompt) and not last_is_assistant:
                raise APIError(400, "continue_final_message / add_generation_prompt=false need the last message to "
                                    "be an assistant message to continue", param="messages")
            tools = req.tools if req.tools and self.state.model.supports_tools else None
            ids = encode_messages(self.state, messages_for_tokenizer(req.messages, continue_last=continue_last), tools)
        else:
            ids = self.encode_text(req.prompt, req.add_special_tokens is not False)
        pieces = self.state.tokenizer.piece_texts
        return TokenizeResponse(count=len(ids), max_model_len=self.state.model.max_model_len, tokens=ids,
                                token_strs=[pieces[t] for t in ids] if req.return_token_strs else None)

    def detokenize(self, req: DetokenizeRequest) -> DetokenizeResponse:
        self._resolve(req.model)
        tok = self.state.tokenizer
        check_token_ids(req.tokens, tok.vocab_size, "tokens")
        return DetokenizeResponse(prompt=tok.decode(req.tokens, skip_special=False))

    def info(self) -> TokenizerInfoResponse:
        tok: Any = self.state.tokenizer
        pieces = tok.piece_texts
        return TokenizerInfoResponse(
            tokenizer_class=f"mistral-common SentencePiece {tok.version}", bos_token=pieces[tok.bos_id],
            eos_token=pieces[tok.eos_id], unk_token=tok.id_to_piece(tok.unk_id),
            model_max_length=self.state.model.max_model_len, vocab_size=tok.vocab_size)
