import numpy as np

from carlos.tokenizer import BOS_ID, EOS_ID, ByteTokenizer


def test_round_trip_of_any_text():
    tok = ByteTokenizer()
    text = "héllo wörld\n\t🙂 ﬁ \x00"
    assert tok.decode(tok.encode(text)) == text
    assert all(0 <= i < 256 for i in tok.encode(text))


def test_vocabulary_and_dtype():
    assert ByteTokenizer().vocab_size == 256 and ByteTokenizer().dtype == np.uint8
    assert ByteTokenizer(add_bos=True).vocab_size == 257
    assert ByteTokenizer(add_eos=True).vocab_size == 258
    assert ByteTokenizer(True, True).dtype == np.uint16


def test_documents_get_bos_and_eos_and_decode_drops_them():
    tok = ByteTokenizer(add_bos=True, add_eos=True)
    ids = tok.encode_document("ab")
    assert ids == [BOS_ID, 97, 98, EOS_ID]
    assert tok.decode(ids) == "ab"


def test_json_round_trip(tmp_path):
    tok = ByteTokenizer(add_bos=True)
    tok.save(tmp_path / "t.json")
    assert ByteTokenizer.load(tmp_path / "t.json") == tok
    d = tok.to_dict()
    assert d["bos_id"] == 256 and d["eos_id"] is None and d["special_tokens"] == {"<bos>": 256}
