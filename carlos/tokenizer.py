"""Byte-level vocabulary: ids 0-255 are bytes, BOS = 256 and EOS = 257 when a corpus asks for them."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

BYTES = 256
BOS_ID = 256
EOS_ID = 257


@dataclass(frozen=True)
class ByteTokenizer:
    add_bos: bool = False
    add_eos: bool = False

    @property
    def bos_id(self) -> int | None:
        return BOS_ID if self.add_bos else None

    @property
    def eos_id(self) -> int | None:
        return EOS_ID if self.add_eos else None

    @property
    def vocab_size(self) -> int:
        # the ids are fixed (BOS 256, EOS 257), so EOS alone still needs 258 rows
        if self.add_eos:
            return EOS_ID + 1
        return BOS_ID + 1 if self.add_bos else BYTES

    @property
    def dtype(self) -> np.dtype:
        """The smallest unsigned integer type that holds every id."""
        return np.dtype(np.uint8) if self.vocab_size <= 256 else np.dtype(np.uint16)

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_document(self, text: str) -> list[int]:
        ids = list(text.encode("utf-8"))
        if self.add_bos:
            ids.insert(0, BOS_ID)
        if self.add_eos:
            ids.append(EOS_ID)
        return ids

    def decode_bytes(self, ids) -> bytes:
        """The bytes of ids, special tokens dropped."""
        return bytes(int(i) for i in ids if 0 <= int(i) < BYTES)

    def decode(self, ids) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def to_dict(self) -> dict:
        specials = {}
        if self.add_bos:
            specials["<bos>"] = BOS_ID
        if self.add_eos:
            specials["<eos>"] = EOS_ID
        return {
            "type": "byte",
            "vocab_size": self.vocab_size,
            "bytes": BYTES,
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "special_tokens": specials,
            "add_bos": self.add_bos,
            "add_eos": self.add_eos,
            "dtype": self.dtype.name,
        }

    @classmethod
    def from_dict(cls, d: dict) -> ByteTokenizer:
        return cls(add_bos=bool(d.get("add_bos", False)), add_eos=bool(d.get("add_eos", False)))

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> ByteTokenizer:
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
