"""Secrets never reach a file a run writes or a line it prints: given by environment, by an
api_key binding, by a gin macro, or only shaped like a key; on success and on the error path."""

import json
import os
import shlex
import subprocess
import sys

import pytest

from conftest import serve_on_loopback
from xwin_jax import redaction

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV_KEY = "env-sentinel-Qx81Vb"  # no key shape: caught because OPENAI_API_KEY holds it
MACRO_KEY = "macro-sentinel-Jt55Lw"  # no key shape: caught by the macro's name
SHAPED_KEY = "sk-shapedsentinel9Kd2"  # under an innocent name: caught by its shape
HF_KEY = "hf_tokensentinel7Ww3"
BEARER = "Bearer bearersentinel4Pp0"
SENTINELS = (ENV_KEY, MACRO_KEY, SHAPED_KEY, HF_KEY, BEARER.split()[1])


def test_redact_gin_by_name_and_by_value_and_nothing_else():
    text = ("judge.OpenAIJudge.api_key = 'sk-123456789'\nmodel = 'gpt-4'\nX.token = 'abc'\n"
            "pipeline.run.num_tokens = 8\nTOKENIZER = '/m/tokenizer.model'\n"
            "serve.password = ('part-one'\n    'part-two')\nafter = 1\n"
            "block:\n  api_key = 'k'\n  model = 'm'\n"
            f"OPENAI_API_KEY = '{MACRO_KEY}'\nHF_TOKEN = 'x'\nhf.save_hf.pad_token_id = 0\n"
            f"NOTE = 'uses {SHAPED_KEY} and {HF_KEY}'\nHEADER = '{BEARER}'\n"
            "max_new_tokens = 256\nstop_tokens = [2]\n")
    out = redaction.redact_gin(text)
    for secret in ("sk-123456789", "abc", "part-one", "part-two", "'k'", *SENTINELS,
                   "HF_TOKEN = 'x'"):
        assert secret not in out
    for kept in ("model = 'gpt-4'", "pipeline.run.num_tokens = 8", "after = 1",
                 "TOKENIZER = '/m/tokenizer.model'", "  model = 'm'", "max_new_tokens = 256",
                 "hf.save_hf.pad_token_id = 0", "stop_tokens = [2]", "NOTE = 'uses <redacted>"):
        assert kept in out


@pytest.mark.parametrize("name,secret", [
    ("OPENAI_API_KEY", True), ("api_key", True), ("judge.OpenAIJudge.api_key", True),
    ("HF_TOKEN", True), ("access_token", True), ("db_password", True), ("client_secret", True),
    ("%OPENAI_API_KEY", True), ("num_tokens", False), ("pad_token_id", False),
    ("TOKENIZER", False), ("max_new_tokens", False), ("monkey", False)])
def test_secret_names(name, secret):
    assert redaction.is_secret_name(name) == secret


class _Judge:
    """An OpenAI-compatible judge: answers verdicts to the right key; `refuse` makes it answer
    401 echoing the Authorization header back, as a badly behaved proxy might."""

    def __init__(self, refuse):
        self.refuse, self.keys = refuse, []

    def app(self):
        import fastapi
        from fastapi.responses import JSONResponse

        app = fastapi.FastAPI()

        @app.post("/v1/chat/completions")
        async def chat(body: dict, request: fastapi.Request):
            header = request.headers.get("authorization", "")
            self.keys.append(header)
            if self.refuse:
                return JSONResponse({"error": {"message": f"bad credentials: {header}",
                                               "type": "invalid_request_error"}},
                                    status_code=401)
            verdict = {"better": "A", "rating_a": 8, "rating_b": 3,  # a judge that leaks
                       "reason": f"checked with {header} ({header.split()[-1]})"}  # the key
            return {"id": "x", "object": "chat.completion", "created": 0, "model": "m",
                    "choices": [{"index": 0, "finish_reason": "stop", "message": {
                        "role": "assistant", "content": json.dumps(verdict)}}],
                    "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}}
        return app


def _outputs(tmp_path):
    model = [{"instruction": f"Q{i}?", "output": f"model answer {i}", "generator": "m"}
             for i in range(3)]
    reference = [{"instruction": f"Q{i}?", "output": f"reference {i}", "generator": "r"}
                 for i in range(3)]
    for name, records in (("model.json", model), ("reference.json", reference)):
        (tmp_path / name).write_text(json.dumps(records))


def _launch_evaluate(tmp_path, port, out_dir, *flags):
    bindings = [
        f"MODEL_OUTPUTS = '{tmp_path / 'model.json'}'",
        f"REFERENCE_OUTPUTS = '{tmp_path / 'reference.json'}'", f"OUTPUT_DIR = '{out_dir}'",
        "JUDGE = @judge.OpenAIJudge()", f"judge.OpenAIJudge.base_url = 'http://127.0.0.1:{port}/v1'",
        "judge.OpenAIJudge.backoff_s = 0.01", "judge.OpenAIJudge.max_attempts = 2",
        f"OPENAI_API_KEY = '{MACRO_KEY}'", "judge.OpenAIJudge.api_key = %OPENAI_API_KEY",
        f"NOTE = '{SHAPED_KEY} {HF_KEY} {BEARER}'"]
    cmd = [sys.executable, "-m", "xwin_jax.launch", "--gin_file=runs/evaluate.gin",
           *(f"--gin_bindings={b}" for b in bindings), *flags]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OPENAI_API_KEY=ENV_KEY))


def _assert_nothing_leaked(done, out_dir):
    written = {p: open(os.path.join(root, p), "rb").read().decode("utf-8", "replace")
               for root, _, files in os.walk(out_dir) for p in files}
    assert "config.gin" in written
    for secret in SENTINELS:
        assert secret not in done.stdout and secret not in done.stderr, secret
        for path, text in written.items():
            assert secret not in text, (secret, path)


def test_secrets_stay_out_of_files_and_prints_on_success(tmp_path):
    _outputs(tmp_path)
    judge = _Judge(refuse=False)
    server, port = serve_on_loopback(judge.app())
    try:
        done = _launch_evaluate(tmp_path, port, tmp_path / "eval")
    finally:
        server.should_exit = True
    assert done.returncode == 0, done.stderr[-3000:]
    assert judge.keys and set(judge.keys) == {f"Bearer {MACRO_KEY}"}  # the macro's key was used
    assert "<redacted>" in open(tmp_path / "eval" / "config.gin").read()
    _assert_nothing_leaked(done, tmp_path / "eval")


@pytest.mark.parametrize("verbose", [False, True])
def test_secrets_stay_out_of_the_error_path(tmp_path, verbose):
    _outputs(tmp_path)
    server, port = serve_on_loopback(_Judge(refuse=True).app())
    try:
        done = _launch_evaluate(tmp_path, port, tmp_path / "eval",
                                *(["--verbose"] if verbose else []))
    finally:
        server.should_exit = True
    assert done.returncode == 2, done.stderr[-3000:]
    assert "401" in done.stderr and "<redacted>" in done.stderr
    assert ("Traceback" in done.stderr) == verbose
    _assert_nothing_leaked(done, tmp_path / "eval")


def test_sweep_and_tpu_scripts_print_and_record_commands_without_credentials(tmp_path):
    env = dict(os.environ, OPENAI_API_KEY=ENV_KEY)
    args = ["--gin_file=gin/experiments/tiny_sft.gin", f"--set=OPENAI_API_KEY='{MACRO_KEY}'",
            f"--set=NOTE='{SHAPED_KEY}'", "--grid=TRAIN_STEPS=[1, 2]", "--name=s",
            f"--root={tmp_path}"]
    printed = subprocess.run([sys.executable, "launch/sweep.py", *args], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=60)
    assert printed.returncode == 0, printed.stderr
    for line in printed.stdout.splitlines():
        assert "--gin.OPENAI_API_KEY='<redacted>'" in shlex.split(line)
    tpu = subprocess.run([sys.executable, "launch/tpu.py", "run", "v", "--zone=z",
                          "--run_name=r", "--gin_file=gin/experiments/tiny_sft.gin",
                          f"--gin.HF_TOKEN='{MACRO_KEY}'", f"--gin.X='{ENV_KEY}'", "--dry_run"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert tpu.returncode == 0, tpu.stderr
    assert "--gin.HF_TOKEN=<redacted>" in tpu.stdout
    for secret in SENTINELS:
        assert secret not in printed.stdout + printed.stderr + tpu.stdout + tpu.stderr
    assert redaction.redact_args([f"--gin_bindings=judge.OpenAIJudge.api_key = '{MACRO_KEY}'",
                                  "--gin.TRAIN_STEPS=2"]) == [
        "--gin_bindings=judge.OpenAIJudge.api_key = '<redacted>'", "--gin.TRAIN_STEPS=2"]


def test_a_key_in_a_binding_that_fails_to_parse_and_in_logging_is_not_shown(tmp_path):
    """The usual mistake — a key without its inner quotes — fails in gin's parser, before any
    client could register the key; and absl/Python logging kept the stream it started with."""
    done = subprocess.run(
        [sys.executable, "-m", "xwin_jax.launch", "--gin_file=runs/convert.gin",
         f"--gin.OPENAI_API_KEY={MACRO_KEY}"], cwd=REPO, capture_output=True, text=True,
        timeout=120)
    assert done.returncode == 2 and MACRO_KEY not in done.stdout + done.stderr
    assert done.stderr.strip().splitlines()[-2].startswith(
        "gin error: --gin_bindings \"OPENAI_API_KEY = '<redacted>'\"")
    script = ("import os\nfrom absl import app, logging\nimport logging as std\n"
              "from xwin_jax import redaction\n"
              "def main(argv):\n"
              "    logging.warning('absl %s', os.environ['MY_SERVICE_TOKEN'])\n"
              "    std.getLogger('x').warning('std %s', os.environ['MY_SERVICE_TOKEN'])\n"
              "    raise RuntimeError('traceback ' + os.environ['MY_SERVICE_TOKEN'])\n"
              "redaction.redact_process_output()\napp.run(main)\n")
    logged = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                            text=True, timeout=120,
                            env=dict(os.environ, MY_SERVICE_TOKEN=ENV_KEY))
    assert "absl <redacted>" in logged.stderr and "std <redacted>" in logged.stderr
    assert "RuntimeError: traceback <redacted>" in logged.stderr
    assert ENV_KEY not in logged.stdout + logged.stderr
