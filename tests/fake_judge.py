"""A stand-in OpenAI-compatible judge for the LLM-judge tests: a local HTTP server that
serves ``/v1/models`` and ``/v1/chat/completions`` and answers with a rule the test gives.

The rule sees the conversation and the two answers in the order the judge was shown them,
so a caller that swaps the answers and maps the scores back wrongly gets wrong verdicts.
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Iterator

_ANSWER = re.compile(r"\[Conversation\]\n(.*)\n\n\[The Start of Assistant 1's Answer\]\n(.*)\n"
                     r"\[The End of Assistant 1's Answer\]\n\n\[The Start of Assistant 2's "
                     r"Answer\]\n(.*)\n\[The End of Assistant 2's Answer\]", re.S)

# (prompt, first, second) -> the reply's text, an HTTP error status, or a whole JSON body
Rule = Callable[[str, str, str], "str | int | dict"]


@contextlib.contextmanager
def fake_judge(rule: Rule, model: str = "judge", api_key: str | None = None,
               lists_models: bool = True) -> Iterator[dict]:
    """Yields {"url", "asked": [(prompt, first, second), ...]} while the server runs; like a
    real server it answers 404 outside ``/v1/`` (and to ``/v1/models`` if not
    ``lists_models``)."""
    state: dict = {"asked": [], "lock": threading.Lock()}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def reply(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def authorised(self) -> bool:
            if api_key is None or self.headers.get("Authorization") == f"Bearer {api_key}":
                return True
            self.reply(401, {"error": {"message": "bad key", "type": "auth", "code": 401}})
            return False

        def found(self) -> bool:
            if self.path.startswith("/v1/") and (lists_models or "models" not in self.path):
                return True
            self.reply(404, {"error": {"message": "not found", "type": "x", "code": 404}})
            return False

        def do_GET(self) -> None:
            if not self.found() or not self.authorised():
                return
            self.reply(200, {"object": "list", "data": [
                {"id": model, "object": "model", "created": 0, "owned_by": "test"}]})

        def do_POST(self) -> None:
            request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if not self.found() or not self.authorised():
                return
            question = _ANSWER.search(request["messages"][-1]["content"])
            prompt, first, second = question.groups() if question else ("", "", "")
            with state["lock"]:
                state["asked"].append((prompt, first, second))
            answer = rule(prompt, first, second)
            if isinstance(answer, int):
                self.reply(answer, {"error": {"message": "refused", "type": "x", "code": answer}})
                return
            if isinstance(answer, dict):
                self.reply(200, answer)
                return
            self.reply(200, {"id": "c", "object": "chat.completion", "created": 0,
                             "model": request["model"], "choices": [
                                 {"index": 0, "finish_reason": "stop",
                                  "message": {"role": "assistant", "content": answer}}],
                             "usage": {"prompt_tokens": 1, "completion_tokens": 1,
                                       "total_tokens": 2}})

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield {"url": f"http://127.0.0.1:{server.server_address[1]}/v1", "asked": state["asked"]}
    finally:
        server.shutdown()
        server.server_close()
