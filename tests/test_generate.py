import io
import subprocess
import sys

import torch

from carlos.generate import Utf8Stream, prompt_ids
from carlos.tokenizer import ByteTokenizer
from tests.conftest import gpt_config


def test_default_prompt_is_bos_when_the_model_has_it_else_a_newline():
    assert prompt_ids(ByteTokenizer(add_bos=True), None) == [256]
    assert prompt_ids(ByteTokenizer(), None) == [10]
    assert prompt_ids(ByteTokenizer(add_bos=True), "ab") == [256, 97, 98]
    assert prompt_ids(ByteTokenizer(), "ab") == [97, 98]


def test_stream_holds_back_an_incomplete_utf8_character():
    out = io.StringIO()
    stream = Utf8Stream(out)
    for b in b"a":
        stream(b)
    euro = "€".encode()  # three bytes
    stream(euro[0])
    stream(euro[1])
    assert out.getvalue() == "a"  # nothing half-written
    stream(euro[2])
    assert out.getvalue() == "a€"
    stream(257)  # EOS and BOS are not text
    stream(0xFF)  # an invalid byte becomes U+FFFD, it does not stop the stream
    stream.close()
    assert out.getvalue() == "a€\ufffd"


def test_sample_does_not_import_lightning(tmp_path):
    from carlos.model import GPT

    model = GPT(gpt_config(block_size=16))
    ckpt = {
        "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
        "carlos": {"model": model.cfg.to_dict(), "tokenizer": ByteTokenizer().to_dict(), "step": 0},
    }
    torch.save(ckpt, tmp_path / "m.pt")
    code = (
        "import sys; from carlos.cli import main\n"
        f"main(['sample', '--checkpoint', {str(tmp_path / 'm.pt')!r}, '--max_new_tokens', '5', '--prompt', 'hi'])\n"
        "print('LIGHTNING', any(m.split('.')[0] in ('lightning', 'pytorch_lightning') for m in sys.modules))\n"
    )
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("hi") and "LIGHTNING False" in p.stdout
