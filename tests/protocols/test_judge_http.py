"""The OpenAI-compatible HTTP judge against a stub server on the loopback address."""
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from distillm2_jax.cli import main
from distillm2_jax.errors import UserError
from distillm2_jax.protocols import judge
from distillm2_jax.protocols.judge_backends import HttpJudge, build_judge, chat_completions_url


class Stub:
    """A chat-completions server: `mode` picks its behaviour; requests are recorded."""

    def __init__(self):
        self.requests, self.mode, self.calls = [], "ok", 0
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                stub.calls += 1
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.requests.append((self.path, dict(self.headers), body))
                if stub.mode == "slow":
                    time.sleep(1.0)
                if stub.mode == "500-once" and stub.calls == 1 or stub.mode == "500":
                    return self._send(500, b'{"error": "overloaded"}')
                if stub.mode == "404" or self.path != "/v1/chat/completions":
                    return self._send(404, b"no such route")
                if stub.mode == "not-json":
                    return self._send(200, b"<html>")
                if stub.mode == "no-choices":
                    return self._send(200, b'{"object": "error"}')
                user = body["messages"][-1]["content"]
                first = user.split("Assistant A's Answer]\n")[1]
                verdict = "[[A]]" if first.startswith("student") else "[[C]]"   # student always wins or ties
                self._send(200, json.dumps({"choices": [{"message": {"role": "assistant",
                                                                     "content": f"Reasoning. {verdict}"}}]}).encode())

            def _send(self, code, data):
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def stub(monkeypatch):
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    s = Stub()
    yield s
    s.server.shutdown()
    s.server.server_close()


def test_url_forms():
    assert chat_completions_url("http://h:8000") == "http://h:8000/v1/chat/completions"
    assert chat_completions_url("http://h:8000/v1/") == "http://h:8000/v1/chat/completions"
    assert chat_completions_url("https://h/v1/chat/completions") == "https://h/v1/chat/completions"
    with pytest.raises(UserError, match="http"):
        chat_completions_url("h:8000")


def test_http_judge_runs_the_protocol(stub, monkeypatch):
    monkeypatch.setenv("JUDGE_KEY", "sekret")
    j = build_judge(url=stub.url, model_name="judge-7b", api_key_env="JUDGE_KEY", max_new_tokens=64, seed=5)
    items = [judge.Item(f"question {i}", f"student {i}", f"reference {i}", f"r:{i}") for i in range(3)]
    res, _ = judge.run(j, items)
    # student first -> [[A]] = win; student second -> [[C]] = tie: (3 + 0.5 * 3) / 6
    assert res.win_rate == pytest.approx(0.75) and res.unparseable == 0
    assert len(stub.requests) == 6
    path, headers, body = stub.requests[0]
    assert path == "/v1/chat/completions" and headers["Authorization"] == "Bearer sekret"
    assert body["model"] == "judge-7b" and body["temperature"] == 0.7 and body["max_tokens"] == 64
    assert [m["role"] for m in body["messages"]] == ["system", "user"]
    assert sorted(r[2]["seed"] for r in stub.requests) == list(range(5, 11))


def test_http_errors_are_one_line(stub):
    conv = [judge.judge_messages("q", "student", "reference")]
    stub.mode = "500-once"                 # retried, then fine
    assert HttpJudge(stub.url, "m", retries=1)(conv) == ["Reasoning. [[A]]"]
    for mode, message in (("500", "HTTP 500"), ("404", "HTTP 404"), ("not-json", "not JSON"),
                          ("no-choices", "no choices")):
        stub.mode = mode
        with pytest.raises(UserError, match=message) as err:
            HttpJudge(stub.url, "m", retries=0)(conv)
        assert stub.url in str(err.value) and "\n" not in str(err.value)
    stub.mode = "slow"
    with pytest.raises(UserError, match="no answer within 0.3 s"):
        HttpJudge(stub.url, "m", timeout=0.3, retries=0)(conv)
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    with pytest.raises(UserError, match="cannot connect"):
        HttpJudge(f"http://127.0.0.1:{port}", "m", retries=0)(conv)
    with pytest.raises(UserError, match="--judge-model"):
        build_judge(url=stub.url)
    with pytest.raises(UserError, match="one of the two"):
        build_judge()


def test_judge_command_with_the_http_judge(stub, tmp_path, capsys):
    refs = tmp_path / "refs.jsonl"
    refs.write_text("".join(json.dumps({"instruction": f"q{i}", "output": f"reference {i}"}) + "\n" for i in range(4)))
    answers = tmp_path / "answers.jsonl"
    answers.write_text("".join(json.dumps({"prompt": f"q{i}", "response": f"student {i}"}) + "\n" for i in range(4)))
    out = tmp_path / "judged.json"
    assert main(["judge", "--answers", str(answers), "--references", str(refs), "--judge-url", stub.url,
                 "--judge-model", "m", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "win rate 75.00%" in printed and "unparseable verdicts: 0 of 8" in printed
    saved = json.loads(out.read_text())
    assert saved["summary"]["win_rate"] == pytest.approx(0.75) and len(saved["judgments"]) == 4
    stub.mode = "404"
    assert main(["judge", "--answers", str(answers), "--references", str(refs), "--judge-url", stub.url,
                 "--judge-model", "m"]) == 2
    assert "HTTP 404" in capsys.readouterr().err
