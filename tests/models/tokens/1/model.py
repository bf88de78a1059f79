"""tokens: streams text_input back one word per response (index = the word's place), from a
thread, as an LLM streams tokens. Parameters: "max_tokens" stops early; "fail_after" sends
an error response (final) after that many words."""

from __future__ import annotations

import json
import threading
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests: list[Any]) -> None:
        for request in requests:
            text = pb_utils.get_input_tensor_by_name(request, "text_input").as_numpy()[0]
            words = (text.decode() if isinstance(text, bytes) else str(text)).split()
            params = json.loads(request.parameters())
            sender = request.get_response_sender()
            threading.Thread(target=self._stream, args=(sender, words, params), daemon=True).start()
        return None

    def _stream(self, sender: Any, words: list[str], params: dict[str, Any]) -> None:
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        limit = int(params.get("max_tokens", len(words)))
        fail_after = params.get("fail_after")
        for i, word in enumerate(words[:limit]):
            if fail_after is not None and i == int(fail_after):
                sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError("tokenizer broke")), flags=final)
                return
            out = [
                pb_utils.Tensor("text_output", np.array([word.encode()], dtype=np.object_)),
                pb_utils.Tensor("index", np.array([i], dtype=np.int32)),
            ]
            sender.send(pb_utils.InferenceResponse(output_tensors=out))
        sender.send(flags=final)
